"""LoRA benchmark: many adapters in one batch vs the base alone, adapter load time, adapter vs full fine-tune memory.

    python -m bench.lora                     # SmolLM2-135M (fp32, CPU, 1 thread); writes bench/results/lora.{json,md}
    python -m bench.lora --repeats 1 --requests 8 --output-len 16   # a quick look

Throughput: `--requests` greedy requests (`--prompt-len` random prompt ids, exactly `--output-len` output
tokens, `ignore_eos`) go through one `LLMEngine` in one continuous batch, with every request on the base
(N=0) or spread round-robin over N adapters (N = 1, 4, 16: each step's forward carries N adapters).
Adapters are rank-16 on all seven projections (like `kvfleet model finetune`'s); the two trained ones
(bible-lora, python-lora) are used first when cached, random ones fill up to 16. Each configuration
runs `--repeats` times on a fresh engine (no prefix-cache reuse; adapters preloaded, so load time is
not in the throughput), the configurations interleaved; the median tok/s is reported, with decode step
times p50/p90/p99.
Load time: a cold `AdapterManager.ensure` of each adapter (safetensors read + device copy).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def adapters_for(base: Path, n: int, tmp: Path) -> list[Path]:
    from kvfleet.dataplane.model.tiny import write_random_lora

    from kvfleet.tools.finetune import RECIPES, finetune_dir

    dirs = []
    for r in RECIPES:
        if r.kind == "lora":
            try:
                dirs.append(finetune_dir(r, base))  # cached by `make finetunes` (trains when missing)
            except Exception as e:  # noqa: BLE001 - a bench without the trained ones still runs
                print(f"no trained {r.name}: {e}")
    i = 0
    while len(dirs) < n:
        dirs.append(write_random_lora(tmp / f"random-{i}", base, rank=16, alpha=32.0, seed=100 + i, std=0.02))
        i += 1
    return dirs[:n]


def run_once(base: Path, adapters: list[Path], n: int, args: argparse.Namespace) -> dict[str, Any]:
    from kvfleet.dataplane.config import AdapterConfig, EngineConfig
    from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
    from kvfleet.dataplane.engine.llm_engine import LLMEngine

    specs = tuple(AdapterConfig(f"a{i}", str(d), preload=True) for i, d in enumerate(adapters[:n]))
    cfg = EngineConfig(model_dir=str(base), variant="base", dtype="float32", device="cpu",
                       max_num_seqs=args.requests, max_num_batched_tokens=args.requests * args.prompt_len,
                       num_kv_blocks=args.requests * ((args.prompt_len + args.output_len) // 16 + 2),
                       adapters=specs, max_active_adapters=max(n, 1), adapter_memory_bytes=2 << 30)
    engine = LLMEngine.from_config(cfg)
    rng = random.Random(7)
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    for i in range(args.requests):
        prompt = [rng.randrange(256, engine.model_config.vocab_size) for _ in range(args.prompt_len)]
        engine.add_request(GenerationRequest(f"r{i}", prompt, sp, variant=f"a{i % n}" if n else "base"))
    steps: list[float] = []
    start = time.perf_counter()
    tokens = 0
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - t0)
        tokens += sum(len(o.new_token_ids) for o in outs)
    wall = time.perf_counter() - start
    decode = steps[1:]  # the first step prefills every prompt
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "decode_step_ms": [s * 1000 for s in decode]}


def load_times(base: Path, adapters: list[Path]) -> dict[str, Any]:
    from kvfleet.dataplane.config import AdapterConfig, EngineConfig
    from kvfleet.dataplane.engine.adapters import AdapterManager
    from kvfleet.dataplane.model.config import ModelConfig

    cfg = EngineConfig(model_dir=str(base), adapters=tuple(AdapterConfig(f"a{i}", str(d))
                                                           for i, d in enumerate(adapters)), max_active_adapters=1)
    mgr = AdapterManager.from_config(cfg, ModelConfig.from_dir(base), torch.device("cpu"), torch.float32)
    times = []
    for i in range(len(adapters)):
        t0 = time.perf_counter()
        mgr.ensure([f"a{i}"])
        times.append((time.perf_counter() - t0) * 1000)
    return {"load_ms": times, "adapter_bytes": mgr.sizes["a0"],
            "adapter_file_bytes": (adapters[0] / "adapter_model.safetensors").stat().st_size}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "lora")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kvfleet.dataplane.model.loader import safetensors_files
    from kvfleet.dataplane.model.smollm2 import smollm2_dir

    base = Path(smollm2_dir())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = adapters_for(base, 16, Path(tmp))
        # NOTE: repeats interleave the configurations, so load from other jobs on a shared machine hits all alike
        by_n: dict[int, list[dict[str, Any]]] = {n: [] for n in (0, 1, 4, 16)}
        for _ in range(args.repeats):
            for n in by_n:
                by_n[n].append(run_once(base, adapters, n, args))
        for n, runs in by_n.items():
            steps = [s for r in runs for s in r["decode_step_ms"]]
            rows.append({"adapters_in_batch": n, "tok_s_median": statistics.median(r["tok_s"] for r in runs),
                         "tok_s_runs": [r["tok_s"] for r in runs], "decode_step_ms_p50": pct(steps, 50),
                         "decode_step_ms_p90": pct(steps, 90), "decode_step_ms_p99": pct(steps, 99)})
            print(json.dumps(rows[-1]), flush=True)
        loads = load_times(base, adapters)
    full_bytes = sum(f.stat().st_size for f in safetensors_files(base))
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": args.threads, "python": platform.python_version(), "torch": torch.__version__},
        "workload": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32)", "requests": args.requests,
                     "prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
                     "adapters": "rank 16, alpha 32, q/k/v/o/gate/up/down"},
        "throughput": rows,
        "load_ms_p50": pct(loads["load_ms"], 50), "load_ms_p90": pct(loads["load_ms"], 90),
        "load_ms_p99": pct(loads["load_ms"], 99), "load_ms": loads["load_ms"],
        "adapter_bytes_resident_fp32": loads["adapter_bytes"], "adapter_file_bytes": loads["adapter_file_bytes"],
        "full_finetune_file_bytes_fp32": full_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    base_tps = rows[0]["tok_s_median"]
    md = ["# LoRA: adapters in one batch vs the base alone", "",
          f"Command: `make bench-lora` (= `python -m bench.lora`). {result['machine']}", "",
          f"Workload: {result['workload']}", "",
          "| adapters in the batch | tok/s (median) | vs base | decode step p50 / p90 / p99 (ms) |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['adapters_in_batch'] or 'base only'} | {r['tok_s_median']:.1f} | "
                  f"{r['tok_s_median'] / base_tps:.2f}x | {r['decode_step_ms_p50']:.1f} / "
                  f"{r['decode_step_ms_p90']:.1f} / {r['decode_step_ms_p99']:.1f} |")
    md += ["", f"Adapter load (cold, from safetensors, {len(loads['load_ms'])} adapters): p50 "
           f"{result['load_ms_p50']:.1f} ms, p90 {result['load_ms_p90']:.1f} ms, p99 {result['load_ms_p99']:.1f} ms.",
           "", f"Memory: one adapter {loads['adapter_bytes'] / 2**20:.1f} MiB resident (fp32; file "
           f"{loads['adapter_file_bytes'] / 2**20:.1f} MiB) vs a full fine-tune {full_bytes / 2**20:.1f} MiB "
           f"({full_bytes / loads['adapter_bytes']:.0f}x)."]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
