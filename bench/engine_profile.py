"""Profile kvfleet's offline engine run (the `bench/engine.py` workload): where a step's time goes.

    python -m bench.engine_profile --requests 32 --label before   # writes bench/results/engine_profile_<label>.json

Two views of the same kind of run (fresh engine each, after a warm-up):
- torch.profiler (CPU): the top operators by self CPU time;
- cProfile: the top Python functions by cumulative and by own time (the per-step Python overhead).
`--render` joins the labelled JSONs into `bench/results/engine_profile.md`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from typing import Any

import torch

from bench.engine import RESULTS, make_workload, run_kvfleet


def profile(requests: int, threads: int, top: int) -> dict[str, Any]:
    from kvfleet.dataplane.model.loader import load_model
    from kvfleet.dataplane.model.smollm2 import smollm2_dir

    torch.set_num_threads(threads)
    model_dir = str(smollm2_dir())
    model, mc = load_model(model_dir, dtype=torch.float32, device="cpu")
    work = make_workload(requests, mc.vocab_size, 0, (16, 256), (16, 128))
    run_kvfleet(model, mc, model_dir, make_workload(2, mc.vocab_size, 99, (8, 8), (4, 4)), torch.float32, 64)
    plain = run_kvfleet(model, mc, model_dir, work, torch.float32, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_kvfleet(model, mc, model_dir, work, torch.float32, 64)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    pr = cProfile.Profile()
    pr.enable()
    run_kvfleet(model, mc, model_dir, work, torch.float32, 64)
    pr.disable()
    views = {}
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        views[key] = s.getvalue().split("   ncalls", 1)[-1]
    return {"requests": requests, "threads": threads, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "loadavg_1m": os.getloadavg()[0], "unprofiled": plain, "torch_profiler": table,
            "cprofile_cumulative": "   ncalls" + views["cumulative"], "cprofile_tottime": "   ncalls" + views["tottime"]}


def render(labels: list[str]) -> None:
    lines = ["# Profile of kvfleet's offline engine run (bench/engine_profile.py)", "",
             "SmolLM2-135M, float32, the `bench/engine.py` workload (seed 0, prompts 16-256, outputs 16-128, "
             "greedy, ignore_eos), one fresh engine per view; torch.profiler and cProfile each add overhead, "
             "so their times are only comparable within a view.", ""]
    for label in labels:
        r = json.loads((RESULTS / f"engine_profile_{label}.json").read_text())
        u = r["unprofiled"]
        lines += [f"## {label}: {r['date_utc']} UTC, {r['requests']} requests, {r['threads']} thread(s), "
                  f"load avg {r['loadavg_1m']:.1f}", "",
                  f"Unprofiled run: {u['output_tok_s']:.1f} output tok/s, {u['wall_s']:.1f} s "
                  f"(load {u['loadavg_1m']:.1f}).", "",
                  "### torch.profiler, top operators by self CPU time", "", "```", r["torch_profiler"].rstrip(),
                  "```", "", "### cProfile, by cumulative time", "", "```", r["cprofile_cumulative"].rstrip(), "```",
                  "", "### cProfile, by own time", "", "```", r["cprofile_tottime"].rstrip(), "```", ""]
    (RESULTS / "engine_profile.md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--label", default="before")
    ap.add_argument("--render", nargs="*", help="labels to join into engine_profile.md (no profiling)")
    args = ap.parse_args()
    if args.render is None:
        res = profile(args.requests, args.threads, args.top)
        (RESULTS / f"engine_profile_{args.label}.json").write_text(json.dumps(res, indent=2) + "\n")
        render([args.label])
    else:
        render(args.render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
