"""`kvfleet simulate`: replay a trace under kvfleet's planner, an HPA on GPU utilisation and KEDA on queue depth.

    kvfleet simulate --trace FILE                  # h100-8b profile, all three controllers, prints a table
    kvfleet simulate --write-sample FILE --seed 0  # the bursty two-class sample trace
    kvfleet simulate --sample --seed 0 --record bench/results/fleet_sim   # what `make bench-fleet-sim` runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvfleet.operator.api.fleet import Autoscaling

from .controllers import Controller, make_controller
from .profiles import PROFILES
from .run import Result, Simulation
from .trace import Request, SampleShape, TraceError, read_trace, sample_trace, write_trace

GOAL = ("critical class >= 99% attainment, >= 30% fewer GPU-hours than the better baseline at equal "
        "attainment, breach-to-scale-up <= 30 s")


METHOD = """\
How to read it:

- A simulation, not a measurement: pods are cost models (see `kvfleet/simulate/profiles.py` for the
  h100-8b ceilings and the cpu-smollm2 fit to `engine_online.md`); a new pod loads its model for the
  profile's startup time (h100-8b: 90 s, an assumption) and costs GPU time from the moment it is
  created until it is gone; a scale-down drains for drainSeconds (30 s) and what is still running
  then is cut and counts as missed. Requests still in flight at the end count as missed.
- Attainment: the share of ALL the class's requests meeting both TTFT and TPOT (rejected = missed).
- Breach->up: for the critical class, each time its attainment over the last 60 s (all finished
  requests, ground truth) falls below target, the seconds until the controller next raised the
  replicas (0 when it had already done so within one interval before); "never" if it did not.
- Every controller decides every 15 s over the same router, engine and trace. kvfleet is
  `kvfleet.operator.planner.plan` on the window aggregates the OTLP receiver would have; a
  parenthesised number is a non-default knob (kvfleet: kvPressureLow; HPA: GPU utilisation
  target; KEDA: waiting requests per pod). The baselines use HPA's algorithm: 10% tolerance,
  up at most max(4, 100%) per period, 300 s down-scale stabilisation.
- GPU utilisation (DCGM's "time a kernel ran") stays near 100% on any pod with a running
  sequence, so the HPA scales towards maxReplicas: its GPU-hours are bounded by maxReplicas,
  not by need. KEDA's AverageValue rule asks for minReplicas whenever nothing waits, so it
  shrinks to the minimum between bursts and is caught short by the next one.
"""


def table(results: list[Result], classes: list[str]) -> str:
    head = ["controller", *(f"{c} attainment" for c in classes), "GPU-hours", "peak / mean pods",
            "breach->up s (median / max (episodes))", "scale events", "rejected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.controller, *(f"{100 * r.attainment.get(c, 1.0):.2f}%" for c in classes), f"{r.gpu_hours:.1f}",
               f"{r.peak_pods} / {r.mean_pods:.1f}", r.breach_summary, str(r.scale_events), str(r.rejected)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(results: list[Result], critical: str) -> str:
    mine = [r for r in results if r.controller.startswith("kvfleet")]
    base = [r for r in results if not r.controller.startswith(("kvfleet", "static"))]
    static = [r for r in results if r.controller.startswith("static")]
    if not base or not mine:
        return ""
    lines = []
    for ours in mine:
        line = "- " + _verdict(ours, base, critical)
        fits = [r for r in static if r.attainment[critical] >= ours.attainment[critical] - 0.001]
        if fits:
            ref = min(fits, key=lambda r: r.gpu_hours)
            saving = 1 - ours.gpu_hours / ref.gpu_hours
            others = ", ".join(f"{c} {100 * a:.1f}%" for c, a in ref.attainment.items() if c != critical)
            line += (f" Against a fixed fleet, {ref.controller} ({100 * ref.attainment[critical]:.2f}% {critical}, "
                     f"{others}): {abs(100 * saving):.0f}% {'fewer' if saving >= 0 else 'more'} GPU-hours.")
        lines.append(line)
    return "\n".join(lines)


def _verdict(ours: Result, base: list[Result], critical: str) -> str:
    at_least = [r for r in base if r.attainment[critical] >= ours.attainment[critical] - 0.001]
    ref = min(at_least or base, key=lambda r: r.gpu_hours)
    saving = 1 - ours.gpu_hours / ref.gpu_hours
    worst = max(ours.breach_to_scale_up_s, default=0.0)
    return (f"{ours.controller}: {100 * ours.attainment[critical]:.2f}% {critical} attainment "
            f"({'meets' if ours.attainment[critical] >= 0.99 else 'misses'} 99%); "
            f"{abs(100 * saving):.0f}% {'fewer' if saving >= 0 else 'more'} GPU-hours than {ref.controller} "
            f"({100 * ref.attainment[critical]:.2f}% {critical}; "
            f"{'the cheapest baseline at >= its attainment' if at_least else 'no baseline reached its attainment'}); "
            f"worst breach->scale-up {'never' if math.isinf(worst) else f'{worst:.0f} s'}"
            f"{'' if worst <= 30 else ' (misses 30 s)'}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvfleet simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--trace", type=Path, help="CSV: " + "arrival_s,slo_class,variant,shared_prefix,"
                     "prompt_tokens,output_tokens")
    src.add_argument("--sample", action="store_true", help="replay the generated sample trace (--seed)")
    src.add_argument("--write-sample", type=Path, metavar="FILE", help="write the sample trace and exit")
    ap.add_argument("--seed", type=int, default=0, help="sample trace and routing seed (default 0)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="h100-8b")
    ap.add_argument("--controllers", default="kvfleet,hpa-gpu-util,keda-queue")
    ap.add_argument("--min-replicas", type=int, default=2)
    ap.add_argument("--max-replicas", type=int, default=500)
    ap.add_argument("--initial", type=int, default=None, help="warm pods at t=0 (default: min-replicas)")
    ap.add_argument("--tick", type=float, default=0.2, help="simulation tick in seconds (default 0.2)")
    ap.add_argument("--rate-scale", type=float, default=1.0, help="multiply the sample trace's request rates")
    ap.add_argument("--duration", type=float, default=SampleShape.duration_s, help="sample trace length (s)")
    ap.add_argument("--kv-pressure-low", default="0.4",
                    help="kvfleet's autoscaling.kvPressureLow, the KV headroom it keeps (default 0.4, the API's); "
                    "a comma list runs it once per value, like the next two")
    ap.add_argument("--hpa-target", default="0.7", help="the HPA's GPU utilisation target (default 0.7)")
    ap.add_argument("--keda-target", default="5", help="KEDA's waiting requests per pod (default 5)")
    ap.add_argument("--static", default="", metavar="N[,N...]",
                    help="also run a fixed fleet of N pods (e.g. one provisioned for the peak) as a reference")
    ap.add_argument("--record", type=Path, metavar="PREFIX", help="write PREFIX.md and PREFIX.json")
    args = ap.parse_args(argv)

    shape = SampleShape(duration_s=args.duration, interactive_rps=SampleShape.interactive_rps * args.rate_scale,
                        batch_rps=SampleShape.batch_rps * args.rate_scale)
    if args.write_sample:
        reqs = sample_trace(args.seed, shape)
        write_trace(args.write_sample, reqs)
        print(f"wrote {len(reqs)} requests to {args.write_sample} (seed {args.seed})")
        return 0
    if args.trace:
        try:
            reqs = read_trace(args.trace)
        except TraceError as exc:
            print(f"kvfleet simulate: {exc}", file=sys.stderr)
            return 2
        source = str(args.trace)
    elif args.sample:
        reqs = sample_trace(args.seed, shape)
        source = f"sample trace, seed {args.seed}, rate x{args.rate_scale:g}, {args.duration:g} s"
    else:
        ap.error("give --trace FILE, --sample or --write-sample FILE")
    profile = PROFILES[args.profile]
    policy = Autoscaling()
    knobs = {"kvfleet": args.kv_pressure_low, "hpa-gpu-util": args.hpa_target, "keda-queue": args.keda_target,
             "static": args.static}
    controllers: list[Controller] = []
    for name in args.controllers.split(",") + (["static"] if args.static else []):
        if name not in knobs:
            ap.error(f"--controllers: choose from {','.join(knobs)} (got {name!r})")
        try:
            settings = [float(x) for x in knobs[name].split(",")]
        except ValueError:
            ap.error(f"the setting of {name} must be numbers separated by commas (got {knobs[name]!r})")
        controllers += [make_controller(name, x, args.min_replicas, args.max_replicas) for x in settings]
    results, timings = [], {}
    for ctrl in controllers:
        t0 = time.perf_counter()
        try:
            sim = Simulation(reqs, profile, ctrl, seed=args.seed, initial=args.initial or args.min_replicas,
                             tick_s=args.tick, drain_s=policy.drain_seconds, tail_s=300.0)
        except ValueError as exc:
            print(f"kvfleet simulate: {exc}", file=sys.stderr)
            return 2
        results.append(sim.run())
        timings[ctrl.name] = time.perf_counter() - t0
        print(f"  {ctrl.name}: {timings[ctrl.name]:.1f} s", file=sys.stderr)
    classes = sorted(profile.classes, key=lambda c: not profile.classes[c].critical)
    critical = classes[0]
    out = table(results, classes)
    summary = verdict(results, critical)
    head = (f"{len(reqs)} requests over {reqs[-1].arrival_s:.0f} s ({source}); profile {profile.name}: "
            f"{profile.note}; classes " + ", ".join(
                f"{c} (TTFT {s.ttft_ms:g} ms, TPOT {s.tpot_ms:g} ms, target {s.target:g}"
                f"{'' if s.critical else ', sheddable'})" for c, s in profile.classes.items()))
    print(head)
    print(out)
    print(summary)
    if args.record:
        _record(args, reqs, profile.name, source, head, out, summary, results, timings)
    return 0


def _record(args: argparse.Namespace, reqs: list[Request], profile: str, source: str, head: str, out: str, summary: str,
            results: list[Result], timings: dict[str, float]) -> None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False).stdout.strip() or "unknown"
    except OSError:
        sha = "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    env: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "kvfleet_git_sha": sha,
                           "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
                           "loadavg_1m": os.getloadavg()[0]}
    data = {"environment": env, "trace": {"source": source, "seed": args.seed, "requests": len(reqs),
                                          "rate_scale": args.rate_scale},
            "profile": profile, "tick_s": args.tick, "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas, "goal": GOAL, "summary": summary, "wall_s": timings,
            "results": [{k: v for k, v in r.__dict__.items() if k != "timeline"}
                        | {"timeline": r.timeline[::4]} for r in results]}
    prefix = args.record
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = (f"# Fleet simulator (kvfleet simulate)\n\n{env['date_utc']} UTC, kvfleet {sha}, {cpu} "
          f"({env['cpu_count']} cores, load {env['loadavg_1m']:.1f}), Python {env['python']}; "
          f"sim wall time " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".\n\n"
          f"{head}.\n\n{out}\n\n{summary}\n\nGoal: {GOAL}.\n\n"
          f"Command: `kvfleet simulate {' '.join(sys.argv[2:] if sys.argv[1:2] == ['simulate'] else sys.argv[1:])}`\n\n"
          f"{METHOD}")
    Path(f"{prefix}.md").write_text(md)


if __name__ == "__main__":
    raise SystemExit(main())
