"""Cross-variant KV reuse (DroidSpeak) benchmark: TTFT of variant B on prefixes sibling A cached, with the
quality the profiler measured for the same plan, as a curve over the number of recomputed layers.

    python -m bench.kv_sharing                          # SmolLM2-135M, python-lora -> bible-lora; writes
                                                        # bench/results/kv_sharing.{json,md}
    python -m bench.kv_sharing --docs 3 --doc-tokens 512   # a quick look

Workload: `--docs` long documents (`--doc-tokens` of CPython standard-library source, distinct per doc);
for each one, A answers a question about it first (so A's prefix cache holds the document), then B asks
its own question on the same document. B's TTFT (add_request -> first token, `LLMEngine` stepped
directly, greedy, 8 output tokens) is measured
- without sharing (B recomputes the document: today's behaviour of every engine, whose prefix caches are
  keyed per model and adapter), and
- with sharing for each plan of the profile's curve (the layers B recomputes on A's KV).
Each configuration runs on a fresh engine (A and B preloaded, one warm-up request each), configurations
interleaved per repeat; medians over repeats. Quality columns come from the pair's profile
(`kvfleet profile-sharing`, `bench/kv_sharing_quality.py`): relative perplexity rise and greedy
token agreement of B against B's own prefill, on the same plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROFILES = RESULTS / "kv_sharing_profiles"
QUESTIONS = ("\n# Question: what does the code above do? Answer:", "\n# Question: which function is the most complex?")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def documents(tok: Any, n: int, length: int) -> list[list[int]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    ids = tok.encode("\n".join((lib / f).read_text() for f in ("argparse.py", "difflib.py", "inspect.py")))
    if len(ids) < n * length:
        raise SystemExit(f"kv_sharing bench: the source text has {len(ids)} tokens, {n} docs need {n * length}")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def run_config(base: Path, adapters: dict[str, Path], layers: tuple[int, ...] | None, docs: list[list[int]],
               questions: list[list[int]]) -> dict[str, Any]:
    """One fresh engine; B's TTFT on every document after A's request (sharing with `layers`, or none)."""
    from kvfleet.dataplane.config import AdapterConfig, EngineConfig, KVShareConfig
    from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
    from kvfleet.dataplane.engine.llm_engine import LLMEngine

    a = "a" if "a" in adapters else "base"  # A is an adapter, or the base itself
    sharing = () if layers is None else (KVShareConfig("b", a, tuple(sorted(layers))),)
    doc_len = max(len(d) for d in docs) + max(len(q) for q in questions) + 16
    cfg = EngineConfig(model_dir=str(base), variant="base", dtype="float32", device="cpu", max_num_seqs=4,
                       max_num_batched_tokens=2048, num_kv_blocks=(len(docs) * 3 + 4) * (doc_len // 16 + 2),
                       adapters=tuple(AdapterConfig(n, str(d), preload=True) for n, d in adapters.items()),
                       kv_sharing=sharing)
    engine = LLMEngine.from_config(cfg)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def request(rid: str, prompt: list[int], variant: str) -> tuple[float, float]:
        engine.add_request(GenerationRequest(rid, prompt, sp, variant=variant))
        start, first = time.perf_counter(), None
        while engine.has_unfinished():
            outs = engine.step()
            if first is None and any(o.new_token_ids for o in outs):
                first = time.perf_counter() - start
        return first or float("nan"), time.perf_counter() - start

    for v in (a, "b"):
        request(f"warm-{v}", questions[0] * 3, v)
    ttft_a, ttft_b, total = [], [], 0.0
    t0 = time.perf_counter()
    for i, doc in enumerate(docs):
        ta, _ = request(f"a{i}", doc + questions[0], a)
        tb, _ = request(f"b{i}", doc + questions[1], "b")
        ttft_a.append(ta)
        ttft_b.append(tb)
    total = time.perf_counter() - t0
    return {"ttft_b": ttft_b, "ttft_a": ttft_a, "wall_s": total,
            "requests_per_s": 2 * len(docs) / total, "shared_tokens": engine.stats().shared_prefix_tokens,
            "prompt_tokens_computed": engine.prompt_tokens_computed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="python-lora:bible-lora",
                    help="A:B among the trained LoRA fine-tunes (A may be `base`, the base model itself)")
    ap.add_argument("--profile", default=None, help="the pair's profile JSON (default: bench/results/"
                    "kv_sharing_profiles/A_to_B.json)")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-points", type=int, default=8, help="curve points measured (fewest layers first)")
    ap.add_argument("--out", default=str(RESULTS / "kv_sharing"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from kvfleet.dataplane.kvsharing import SharingProfile, layer_groups
    from kvfleet.dataplane.model.smollm2 import smollm2_dir
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    from kvfleet.tools.finetune import RECIPES, finetune_dir

    base = Path(smollm2_dir())
    name_a, name_b = args.pair.split(":")
    recipes = {r.name: r for r in RECIPES}
    adapters = {"b": finetune_dir(recipes[name_b], base)}
    if name_a != "base":
        adapters["a"] = finetune_dir(recipes[name_a], base)
    profile_path = Path(args.profile or PROFILES / f"{name_a}_to_{name_b}.json")
    profile = SharingProfile.from_json(profile_path.read_text())
    points = sorted(profile.curve, key=lambda p: len(p.layers))
    chosen = [p for p in points if len(p.layers) < profile.num_layers][:args.max_points - 1]
    within = profile.plan(1.0)  # the smallest plan that keeps the quality budget at all, however large
    chosen += [p for p in (within,) if p is not None and p not in chosen and len(p.layers) < profile.num_layers]
    points = chosen + [p for p in points if len(p.layers) == profile.num_layers][:1]
    tok = Tokenizer.from_dir(str(base))
    docs = documents(tok, args.docs, args.doc_tokens)
    questions = [tok.encode(q) for q in QUESTIONS]
    configs: list[tuple[str, tuple[int, ...] | None]] = [("no sharing (B recomputes)", None)]
    configs += [(f"recompute {len(p.layers)}" + (" (within budget)" if profile.meets_budget(p) else ""), p.layers)
                for p in points]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in configs}
    for r in range(args.repeats):
        for name, layers in configs:
            print(f"[kv_sharing] repeat {r + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_config(base, adapters, layers, docs, questions))
    quality = {p.layers: p for p in points}
    rows = []
    baseline = statistics.median(x for run in runs[configs[0][0]] for x in run["ttft_b"])
    for name, layers in configs:
        ttfts = [x for run in runs[name] for x in run["ttft_b"]]
        point = quality.get(layers) if layers is not None else None
        rows.append({"config": name, "layers": list(layers) if layers is not None else None,
                     "ttft_b_p50_s": statistics.median(ttfts), "ttft_b_p90_s": pct(ttfts, 0.9),
                     "ttft_b_p99_s": pct(ttfts, 0.99),
                     "ttft_a_p50_s": statistics.median(x for run in runs[name] for x in run["ttft_a"]),
                     "speedup_ttft_b": baseline / statistics.median(ttfts),
                     "requests_per_s": statistics.median(run["requests_per_s"] for run in runs[name]),
                     "shared_tokens": runs[name][0]["shared_tokens"],
                     "ppl_increase": point.ppl_increase if point else 0.0,
                     "token_agreement": point.token_agreement if point else 1.0})
    meta = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "load_avg": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
            "model": "SmolLM2-135M-Instruct (fp32)", "pair": args.pair, "profile": str(profile_path.relative_to(ROOT))
            if profile_path.is_relative_to(ROOT) else str(profile_path), "docs": args.docs,
            "doc_tokens": args.doc_tokens, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime())}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2))
    lines = [f"# Cross-variant KV reuse: {name_b} on {name_a}'s cached prefix ({args.docs} docs x "
             f"{args.doc_tokens} tokens)", "", "```", json.dumps(meta, indent=1), "```", "",
             "| config | layers recomputed | B TTFT p50 (s) | p90 | p99 | TTFT speedup | req/s | ppl rise | "
             "token agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layers = "-" if r["layers"] is None else ", ".join(f"{a}-{b}" if b > a else str(a)
                                                           for a, b in layer_groups(r["layers"])) or "none"
        lines.append(f"| {r['config']} | {layers} | {r['ttft_b_p50_s']:.3f} | {r['ttft_b_p90_s']:.3f} | "
                     f"{r['ttft_b_p99_s']:.3f} | {r['speedup_ttft_b']:.2f}x | {r['requests_per_s']:.2f} | "
                     f"{r['ppl_increase'] * 100:+.2f}% | {r['token_agreement']:.3f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
