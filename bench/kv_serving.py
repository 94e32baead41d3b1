"""The serving engine under each CachePolicy on SmolLM2-135M: KV bytes, throughput, step latency, fidelity.

    python -m bench.kv_serving              # writes bench/results/kv_serving.{json,md}
    python -m bench.kv_serving --quick      # 3 policies, fewer requests (a smoke run)

`make bench-kv` measures policies with the evaluator (`PolicyAttention`, one sequence, perplexity
and passkey); this runs the PAGED SERVING ENGINE (`LLMEngine`, continuous batching) on the same
fixed, seeded set of requests for every policy, each in a fresh engine:

- KV bytes/token as allocated (block bytes / block size) and vs a 16-bit cache, plus the
  full-precision lane bytes each running sequence holds (sinks + residual + group - 1 tokens);
- output tok/s (wall clock of `generate`) and the latency of every engine step, p50/p90/p99;
- fidelity: greedy output compared with the baseline (fp32 KV, no policy) of the same run: the
  fraction of requests whose whole output is identical, and the mean matching prefix.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def lookahead_module() -> Path:
    """The trained LookaheadKV module of SmolLM2 (`kvfleet train-lookahead`; cached, ~5 min on first use)."""
    from kvfleet.dataplane.model.smollm2 import smollm2_dir

    from kvfleet.tools.lookahead_train import lookahead_dir

    return lookahead_dir(smollm2_dir(), log=lambda m: print(m, file=sys.stderr, flush=True))


def policies(quick: bool) -> dict[str, Any]:
    from kvfleet.dataplane.config import CachePolicyConfig as C

    def q(dtype: str, **kw: Any) -> C:
        return C(key_quantization=dtype, value_quantization=dtype, group_size=32, **kw)

    r = {"residual_tokens": 32, "quant_sink_tokens": 4}
    ev = {"eviction_budget_ratio": 0.5, "eviction_window_tokens": 32, "eviction_sink_tokens": 4}
    grid = {
        "fp32 (baseline)": C(),
        "fp8+R": q("fp8", **r),
        "int8": q("int8"),
        "int8+R": q("int8", **r),
        "int4": q("int4"),
        "int4+R": q("int4", **r),
        "int4+R preRoPE": q("int4", keys_pre_rope=True, **r),
        "fp32 + streaming-llm@50%": C(eviction="streaming-llm", **ev),
        "fp32 + keydiff@50%": C(eviction="keydiff", **ev),
        "fp32 + h2o@50%": C(eviction="h2o", **ev),
        "fp32 + snapkv@50%": C(eviction="snapkv", **ev),
        "int4+R + streaming-llm@50%": q("int4", eviction="streaming-llm", **r, **ev),
        "int4+R + keydiff@50%": q("int4", eviction="keydiff", **r, **ev),
        "int4+R + h2o@50%": q("int4", eviction="h2o", **r, **ev),
    }
    if quick:
        return {k: grid[k] for k in ("fp32 (baseline)", "int4+R", "int4+R + keydiff@50%")}

    def la(keep: float) -> dict[str, Any]:
        return {"eviction": "lookahead", "eviction_budget_ratio": keep, "eviction_window_tokens": 32,
                "eviction_sink_tokens": 4, "lookahead_dir": str(lookahead_module())}

    grid |= {
        # LookaheadKV prompt compression per layer and kv head (bench/results/kv_policies.md): KIVI int4 keeping
        # whole 32-token groups (the grid's best within +2%), and keys per-token after a Hadamard rotation
        "int4+R + lookahead@70%": q("int4", key_granularity="per-channel", **la(0.7), **r),
        "int4 rot+R": q("int4", key_granularity="per-token", rotate_keys=True, **r),
        "int4 rot+R + lookahead@80%": q("int4", rotate_keys=True, **la(0.8), **r),
    }
    return grid


def run_policy(model: Any, mc: Any, model_dir: str, cp: Any, work: list[tuple[list[int], int]],
               max_num_seqs: int, block_size: int) -> dict[str, Any]:
    from kvfleet.dataplane.config import ConfigError, EngineConfig
    from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
    from kvfleet.dataplane.engine.llm_engine import LLMEngine

    tokens = sum(len(p) + o for p, o in work)
    try:
        cfg = EngineConfig(model_dir=model_dir, dtype="float32", device="cpu", max_num_seqs=max_num_seqs,
                           block_size=block_size, num_kv_blocks=tokens // block_size + len(work) + 16,
                           cache_policy=cp)
        engine = LLMEngine(model, mc, cfg, "cpu", torch.float32)
    except (ConfigError, ValueError) as e:
        return {"refused": str(e)}
    for i, (p, o) in enumerate(work):
        engine.add_request(GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=o, temperature=0.0,
                                                                         ignore_eos=True)))
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(work))}
    steps: list[float] = []
    peak = 0  # blocks in use after a step (eviction frees blocks; its win is here, not in bytes per slot)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        s = time.perf_counter()
        for o in engine.step():
            outs[o.request_id] += o.new_token_ids
        steps.append(time.perf_counter() - s)
        peak = max(peak, engine.scheduler.bm.num_used_blocks)
    wall = time.perf_counter() - t0
    kv = engine.runner.kv
    lanes = getattr(kv, "lanes", None)
    bs = cfg.block_size
    block_bytes = (kv.nbytes() - (lanes.nbytes() if lanes is not None else 0)) / cfg.num_kv_blocks
    out_tokens = sum(o for _, o in work)
    ms = np.array(steps) * 1000
    return {
        "kv_bytes_per_token": block_bytes / bs,
        "lane_bytes_per_sequence": (lanes.nbytes() / lanes.num_lanes) if lanes is not None else 0,
        "output_tok_s": out_tokens / wall, "wall_s": wall, "steps": len(steps),
        "step_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                    "p99": float(np.percentile(ms, 99))},
        "evicted_tokens": engine.eviction_stats().tokens_evicted,
        "peak_kv_mib": peak * block_bytes / 2**20,
        "outputs": [outs[f"r{i}"] for i in range(len(work))],
    }


def fidelity(outs: list[list[int]], base: list[list[int]]) -> dict[str, float]:
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    return {"identical": sum(a == b for a, b in zip(outs, base, strict=True)) / len(base),
            "mean_prefix": statistics.mean(prefix(a, b) / len(b) for a, b in zip(outs, base, strict=True))}


MARK_A, MARK_B = "<!-- analysis -->", "<!-- /analysis -->"


def write_md(rep: dict[str, Any], path: Path) -> None:
    """The table; text between the analysis markers of an existing file is kept across re-runs."""
    old = path.read_text() if path.exists() else ""
    m = re.search(re.escape(MARK_A) + r"(.*?)" + re.escape(MARK_B), old, re.S)
    analysis = m.group(1).strip() if m else "_(written after looking at the table)_"
    env = rep["environment"]
    lines = [
        "# The serving engine under each CachePolicy (SmolLM2-135M)", "",
        f"`python -m bench.kv_serving` on {env['cpu']} ({env['cpu_count']} cores shared), torch {env['torch']}, "
        f"{env['torch_threads']} torch thread, Python {env['python']}, kvfleet {env['kvfleet_git_sha']}, "
        f"{env['date_utc']} UTC; load average {env['loadavg']:.1f} at the end. {rep['requests']} requests "
        f"(prompts {rep['prompt_lens']}, outputs {rep['output_lens']} tokens, greedy, `ignore_eos`), max "
        f"{rep['max_num_seqs']} running, blocks of {rep['block_size']} tokens, fp32 model on CPU, each policy in a "
        "fresh engine on the same requests. Quantized rows use groups of 32 (keys per-channel, values per-token; "
        "per-token keys under eviction but lookahead's, which keeps whole groups; `rot` = keys per-token after a "
        "Hadamard rotation), `+R` = 4 sink + 32 residual tokens at full precision; lookahead rows compress each "
        "prompt once per layer and kv head with the trained LookaheadKV module (`kvfleet train-lookahead`). "
        "`peak KV MiB` = the most block bytes in use after any step (eviction's saving).",
        "",
        "`KV B/token` is what the paged blocks allocate (the baseline stores fp32: 16-bit would be half); "
        "`x vs 16-bit` compares with a 16-bit cache of the same model; `lane B/seq` is the full-precision "
        "sink/residual rows each running sequence holds. Fidelity is against the baseline row of this run: "
        "requests with identical output, and the mean fraction of output before the first different token. "
        "Timings on 2 shared cores are noisy; compare rows of one run.", "",
        "| policy | KV B/token | x vs 16-bit | lane B/seq | output tok/s | step p50/p90/p99 ms | identical | "
        "mean prefix | evicted tokens | peak KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rep["results"].items():
        if "refused" in r:
            lines.append(f"| {name} | refused: {r['refused']} ||||||||| ")
            continue
        st = r["step_ms"]
        lines.append(
            f"| {name} | {r['kv_bytes_per_token']:.0f} | {rep['kv_bytes_16bit'] / r['kv_bytes_per_token']:.2f} | "
            f"{r['lane_bytes_per_sequence']:.0f} | {r['output_tok_s']:.1f} | {st['p50']:.0f}/{st['p90']:.0f}/"
            f"{st['p99']:.0f} | {r['fidelity']['identical']:.2f} | {r['fidelity']['mean_prefix']:.2f} | "
            f"{r['evicted_tokens']} | {r['peak_kv_mib']:.1f} |")
    lines += ["", MARK_A, analysis, MARK_B]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from kvfleet.dataplane.model.loader import load_model
    from kvfleet.dataplane.model.smollm2 import smollm2_dir

    from bench.engine import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-num-seqs", type=int, default=12)
    ap.add_argument("--block-size", type=int, default=32, help="32: a per-channel key group (32 tokens) is a block")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model_dir = str(smollm2_dir())
    model, mc = load_model(model_dir, dtype=torch.float32, device="cpu")
    n = 4 if a.quick else a.requests
    prompt_lens, output_lens = ((32, 64), (16, 16)) if a.quick else ((160, 320), (48, 48))
    rng = random.Random(0)
    work = [([rng.randrange(256, mc.vocab_size) for _ in range(rng.randint(*prompt_lens))], rng.randint(*output_lens))
            for _ in range(n)]
    results: dict[str, Any] = {}
    for name, cp in policies(a.quick).items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = run_policy(model, mc, model_dir, cp, work, a.max_num_seqs, a.block_size)
    base = results["fp32 (baseline)"]["outputs"]
    for r in results.values():
        if "outputs" in r:
            r["fidelity"] = fidelity(r.pop("outputs"), base)
    env = environment(1, "float32")
    env["loadavg"] = __import__("os").getloadavg()[0]
    rep = {"environment": env, "requests": n, "prompt_lens": prompt_lens, "output_lens": output_lens,
           "max_num_seqs": a.max_num_seqs, "block_size": a.block_size, "results": results,
           "kv_bytes_16bit": 2 * 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim}
    a.out.mkdir(parents=True, exist_ok=True)
    name = "kv_serving_quick" if a.quick else "kv_serving"
    (a.out / f"{name}.json").write_text(json.dumps(rep, indent=2))
    write_md(rep, a.out / f"{name}.md")
    print((a.out / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
