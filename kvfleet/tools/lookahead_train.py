"""`kvfleet train-lookahead`: train a LookaheadKV module on a model's own attention, reproducibly on a CPU.

    kvfleet train-lookahead                    # SmolLM2-135M (cached: a second run only prints it)
    kvfleet train-lookahead --model DIR        # any model directory

Target: for each training window of P prompt + N continuation tokens, the attention that the N
continuation tokens' queries (teacher-forced, dense) put on each prompt row, per layer and kv head,
summed over each head's query group. Loss: KL divergence from that distribution to the lookahead
tokens' attention on the prompt (`LookaheadKV.mass`), over the rows eviction may drop (sinks and the
recent window are protected, so they are left out). The model stays frozen.

Text: King James Bible books and Python standard-library modules that the evaluation
(`eval_quality`: `eval_cache.bible_text`'s books, `eval_tasks.STDLIB`) never reads. Output:
`$KVFLEET_CACHE/lookahead/<model>-<hash of recipe, version, model and text>/` (`lookahead.pt`,
`lookahead.json` with the recipe, train seconds and held-out diagnostics: the share of the future
attention that the kept rows hold at the recipe's budget, for LookaheadKV, SnapKV and the oracle).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvfleet.tools.cache_entry import publish

LOOKAHEAD_VERSION = 1  # bump when the training code changes what a recipe produces
TRAIN_BOOKS = ("Genesis", "Exodus", "Psalms", "Matthew", "Luke", "Acts")  # not in eval_cache.bible_text
TRAIN_STDLIB = ("collections", "shutil", "tempfile", "csv", "ast", "enum", "configparser", "calendar",
                "pprint", "string", "gettext", "optparse")  # not in eval_tasks.STDLIB


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained module (part of its cache key)."""

    prompt_lengths: tuple[int, ...] = (512, 1024, 1536)  # cycled over the windows
    future_tokens: int = 128  # N
    train_windows: int = 36
    heldout_windows: int = 6
    steps: int = 150
    windows_per_step: int = 2
    lr: float = 3e-3
    num_tokens: int = 8
    rank: int = 8
    alpha: float = 16.0
    sinks: int = 4  # rows left out of the loss (always kept)
    window: int = 32
    budget_ratio: float = 0.4  # diagnostics: share kept
    pooling_kernel: int = 7
    seed: int = 0


@dataclass
class Window:
    """One training window: prompt K/V per layer [P, Hkv, D], the prompt's last 32 queries [32, Hq, D]
    (SnapKV's observation window, for diagnostics) and the target per layer [P, Hkv]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    q_obs: list[torch.Tensor]
    target: list[torch.Tensor]


def training_text() -> tuple[str, str]:
    """(Bible text, Python source) that the evaluation does not read (deterministic)."""
    import importlib.util

    from kvfleet.tools.eval_cache import bible_text

    bible = bible_text(max_chars=400_000, books=TRAIN_BOOKS)
    parts = []
    for name in TRAIN_STDLIB:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            parts.append(Path(spec.origin).read_text())
    return bible, "\n\n".join(parts)


def make_windows(model: Any, token_lists: list[list[int]], recipe: Recipe, start: int, count: int) -> list[Window]:
    """`count` windows, alternating over `token_lists`, prompt lengths cycled from window `start`."""
    from kvfleet.dataplane.kvcache.eviction import attention_probs, received_attention
    from kvfleet.tools.eval_tf import prefill

    n, obs = recipe.future_tokens, 32
    at = [0] * len(token_lists)
    out = []
    for i in range(start + count):
        src = i % len(token_lists)
        p = recipe.prompt_lengths[i % len(recipe.prompt_lengths)]
        ids = token_lists[src][at[src]:at[src] + p + n]
        at[src] += p + n
        if len(ids) < p + n:
            raise ValueError(f"training text too short for window {i}")
        if i < start:
            continue
        rec = prefill(model, ids, window=n + obs)  # q_win [obs + N]: the prompt's last 32, then the future
        with torch.inference_mode():
            target = []
            for k, q in zip(rec.k, rec.q_win, strict=True):
                visible = (torch.arange(p + n)[None, :] <= torch.arange(p, p + n)[:, None])[None]  # [1, N, P+N]
                target.append(received_attention(attention_probs(q[-n:], k, visible), k.shape[1])[:p])
        out.append(Window([k[:p].clone() for k in rec.k], [v[:p].clone() for v in rec.v],
                          [q[:-n].clone() for q in rec.q_win], [t.clone() for t in target]))
    return out


def kl_loss(pred: list[torch.Tensor], target: list[torch.Tensor], sinks: int, window: int) -> torch.Tensor:
    """Mean over layers and kv heads of KL(target || pred), each a distribution over rows
    [sinks, P - window) (pred/target per layer [P, Hkv])."""
    total = torch.zeros(())
    for m, t in zip(pred, target, strict=True):
        m, t = m[sinks:m.shape[0] - window], t[sinks:t.shape[0] - window]  # [R, Hkv]
        logp = torch.log(m + 1e-9) - torch.log(m.sum(0, keepdim=True) + 1e-9)
        pt = t / t.sum(0, keepdim=True)
        total = total + (pt * (torch.log(pt + 1e-12) - logp)).sum(0).mean()
    return total / len(pred)


def captured(scores: list[torch.Tensor], target: list[torch.Tensor], recipe: Recipe) -> float:
    """Share of the future attention on the prompt that the rows kept by `scores` hold (mean over
    layers and kv heads), keeping `budget_ratio` of the rows with sinks and the window protected."""
    from kvfleet.dataplane.kvcache.eviction import protected_mask, select_keep

    got = []
    for s, t in zip(scores, target, strict=True):
        p, h = t.shape
        pos = torch.arange(p)[:, None].expand(p, h)
        keep = select_keep(s, protected_mask(pos, p, recipe.sinks, recipe.window), int(recipe.budget_ratio * p))
        got.append((t.gather(0, keep).sum(0) / t.sum(0)).mean())
    return float(torch.stack(got).mean())


def diagnostics(model: Any, mod: Any, wins: list[Window], recipe: Recipe) -> dict[str, float]:
    """Mean `captured` over `wins` for LookaheadKV, SnapKV (its 32-query window) and the oracle."""
    from kvfleet.dataplane.kvcache.eviction import pool_rows, snapkv_scores

    res: dict[str, list[float]] = {"lookahead": [], "snapkv": [], "oracle": []}
    with torch.inference_mode():
        for w in wins:
            p, h = w.keys[0].shape[:2]
            pos = torch.arange(p)[:, None].expand(p, h)
            snap = [snapkv_scores(q, torch.arange(p - q.shape[0], p), k, pos, recipe.pooling_kernel)
                    for q, k in zip(w.q_obs, w.keys, strict=True)]
            la = [pool_rows(m, recipe.pooling_kernel) for m in mod.mass(model, w.keys, w.values)]
            res["lookahead"].append(captured(la, w.target, recipe))
            res["snapkv"].append(captured(snap, w.target, recipe))
            res["oracle"].append(captured(w.target, w.target, recipe))
    return {k: sum(v) / len(v) for k, v in res.items()}


def train(model: Any, cfg: Any, token_lists: list[list[int]], recipe: Recipe,
          init_ids: list[int] | None = None, log: Any = None) -> tuple[Any, dict[str, Any]]:
    """Train a LookaheadKV module (seeded, deterministic on one thread); -> (module, provenance record)."""
    from kvfleet.dataplane.kvcache.lookahead import LookaheadConfig, LookaheadKV

    torch.manual_seed(recipe.seed)
    model.requires_grad_(False)
    t0 = time.monotonic()
    train_w = make_windows(model, token_lists, recipe, 0, recipe.train_windows)
    held = make_windows(model, token_lists, recipe, recipe.train_windows, recipe.heldout_windows)
    t_data = time.monotonic() - t0
    mod = LookaheadKV(cfg, LookaheadConfig(recipe.num_tokens, recipe.rank, recipe.alpha), seed=recipe.seed)
    if init_ids:
        mod.init_embeddings(model, init_ids)
    before = diagnostics(model, mod, held, recipe) if held else {}
    opt = torch.optim.Adam(mod.parameters(), lr=recipe.lr)
    g = torch.Generator().manual_seed(recipe.seed)
    losses = []
    for step in range(recipe.steps):
        opt.zero_grad()
        pick = torch.randint(len(train_w), (recipe.windows_per_step,), generator=g).tolist()
        loss = sum(kl_loss(mod.mass(model, train_w[i].keys, train_w[i].values), train_w[i].target,
                           recipe.sinks, recipe.window) for i in pick) / len(pick)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        losses.append(float(loss.detach()))  # type: ignore[union-attr]
        if log is not None and (step % 25 == 0 or step == recipe.steps - 1):
            log(f"[train-lookahead] step {step}/{recipe.steps} loss {sum(losses[-25:]) / len(losses[-25:]):.4f}")
    mod.requires_grad_(False)
    after = diagnostics(model, mod, held, recipe) if held else {}
    record = {"recipe": asdict(recipe), "lookahead_version": LOOKAHEAD_VERSION, "parameters": mod.num_parameters(),
              "data_seconds": round(t_data, 1), "train_seconds": round(time.monotonic() - t0 - t_data, 1),
              "loss_first": losses[0] if losses else None, "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
              "heldout_captured_before": before, "heldout_captured_after": after}
    return mod, record


def recipe_key(recipe: Recipe, model_dir: Path, text: str) -> str:
    h = hashlib.blake2b(digest_size=6)
    h.update(json.dumps([LOOKAHEAD_VERSION, asdict(recipe), model_dir.name], sort_keys=True).encode())
    h.update(text.encode())
    return h.hexdigest()


def lookahead_dir(model_dir: Path, recipe: Recipe = Recipe(), log: Any = None) -> Path:
    """The cached module for `model_dir` and `recipe` (trained on first use into a temporary sibling)."""
    from kvfleet.dataplane.model.loader import load_model
    from kvfleet.dataplane.model.smollm2 import cache_root
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    bible, python = training_text()
    target = cache_root() / "lookahead" / f"{model_dir.name}-{recipe_key(recipe, model_dir, bible + python)}"
    if (target / "lookahead.json").is_file():
        return target
    model, cfg = load_model(model_dir, dtype="float32", device="cpu")
    tok = Tokenizer.from_dir(model_dir)
    lists = [tok.encode(bible, add_bos=False), tok.encode(python, add_bos=False)]
    mod, record = train(model, cfg, lists, recipe, tok.encode(" the of and to in a that is", add_bos=False), log)
    record["model"] = model_dir.name
    return publish(target, lambda tmp: mod.save(tmp, record), "lookahead.json")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvfleet train-lookahead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, tiny or a model directory")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    a = p.parse_args(argv)
    from kvfleet.tools.eval_cache import resolve_model

    torch.set_num_threads(a.threads)
    out = lookahead_dir(resolve_model(a.model), log=lambda s: print(s, file=sys.stderr, flush=True))
    rec = json.loads((out / "lookahead.json").read_text())
    print(json.dumps({k: rec[k] for k in ("parameters", "data_seconds", "train_seconds", "loss_first", "loss_last",
                                          "heldout_captured_before", "heldout_captured_after")}, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
