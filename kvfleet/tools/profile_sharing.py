"""`kvfleet profile-sharing`: how much variant B loses by reusing sibling A's prefix KV, layer by layer,
and which layers B should recompute (DroidSpeak). Writes a `SharingProfile` (kvfleet.dataplane.kvsharing).

    kvfleet profile-sharing --from BASE_DIR --to ADAPTER_DIR --base BASE_DIR --from-variant base \\
        --to-variant bible --family smollm2-135m --calibration held_out.txt --out profile.json

Calibration: the file is tokenized (tokenizer of --tokenizer, else --base, else the variants' model dirs)
and cut into windows of prompt + continuation tokens; at most --max-prompts of them, evenly spaced over
the file. Per window, A and B each prefill the prompt; B's continuation is scored against B's own
prefill ("own") at every continuation position (NLL: the C-1 positions whose target is in the window).

1. score[l] = mean KL(own || B with A's K/V in layer l only, every other layer B's own), nats/token.
2. the curve: for n = 0 .. ceil(max_fraction * layers), and n = all layers, the plan recomputes the top-n
   layers by score, merged into at most 3 contiguous groups by filling the smallest gaps first while the
   plan stays within n + SLACK layers (never past floor(max_fraction * layers) when n is within it); when
   a gap does not fit, the group with the smallest summed score is dropped. Each distinct plan is measured
   with `shared_prefix_cache`: pplIncrease = exp(mean NLL shared - mean NLL own) - 1, tokenAgreement
   (greedy argmax equal to own's) and klDivergence (mean KL(own || shared)); `extra.perWindow` keeps each
   window's NLL increase and agreement per point (to tell apart kinds of calibration text).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvfleet.dataplane.kvsharing import layer_groups

MAX_GROUPS = 3  # the E-cache stores one hidden state per group that does not start at layer 0
SLACK = 2  # extra layers a plan may recompute to fill gaps between its top-n layers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def window_starts(num_tokens: int, window: int, max_prompts: int) -> list[int]:
    """Where the calibration windows start: consecutive `window`-token windows, at most max_prompts of them,
    evenly spaced (window k*n//max_prompts of the n that fit)."""
    n = num_tokens // window
    if n == 0:
        raise SystemExit(f"profile-sharing: the calibration has {num_tokens} tokens, fewer than one window "
                         f"({window})")
    picks = range(n) if n <= max_prompts else [k * n // max_prompts for k in range(max_prompts)]
    return [i * window for i in picks]


def plan_layers(ranking: Sequence[int], scores: Sequence[float], n: int, limit: int,
                max_groups: int = MAX_GROUPS) -> tuple[int, ...]:
    """The top-n layers of `ranking` merged into <= max_groups contiguous groups within `limit` layers:
    fill the smallest gap (ties: the lowest) while it fits, else drop the group of least summed score."""
    chosen = set(ranking[:n])
    while len(groups := layer_groups(chosen)) > max_groups:
        size, first = min((b[0] - a[1] - 1, a[1] + 1) for a, b in zip(groups, groups[1:], strict=False))
        if len(chosen) + size <= limit:
            chosen |= set(range(first, first + size))
        else:
            lo, hi = min(groups, key=lambda g: (sum(scores[g[0]:g[1] + 1]), -g[0]))
            chosen -= set(range(lo, hi + 1))
    return tuple(sorted(chosen))


def curve_plans(scores: Sequence[float], max_fraction: float) -> list[tuple[int, tuple[int, ...]]]:
    """(n, plan) for n = 0 .. ceil(max_fraction * L) and n = L; a plan met before is not repeated."""
    num_layers = len(scores)
    ranking = sorted(range(num_layers), key=lambda i: (-scores[i], i))
    cap = math.floor(max_fraction * num_layers)
    targets = list(range(min(num_layers, math.ceil(max_fraction * num_layers)) + 1)) + [num_layers]
    out: list[tuple[int, tuple[int, ...]]] = []
    for n in dict.fromkeys(targets):
        plan = plan_layers(ranking, scores, n, max(n, min(n + SLACK, cap)))
        if plan not in [p for _, p in out]:
            out.append((n, plan))
    return out


class Scorer:
    """Per-position metrics of one window: B's continuation logits [C, V] against B's own."""

    def __init__(self, own: Any, targets: Any) -> None:
        import torch

        self.own_lp = torch.log_softmax(own, dim=-1)  # [C, V]
        self.own_top = own.argmax(-1)  # [C]
        self.targets = targets  # [C-1]: the token after each continuation position but the last

    def kl(self, logits: Any) -> Any:
        """KL(own || these) per position [C]."""
        import torch

        lp = torch.log_softmax(logits, dim=-1)
        return (self.own_lp.exp() * (self.own_lp - lp)).sum(-1)

    def nll(self, logits: Any) -> Any:
        """NLL of the in-window targets [C-1]."""
        import torch

        lp = torch.log_softmax(logits[:-1], dim=-1)
        return -lp.gather(1, self.targets[:, None])[:, 0]

    def agree(self, logits: Any) -> Any:
        return (logits.argmax(-1) == self.own_top).float()  # [C]


def _tokenizer_dir(args: argparse.Namespace, variants: Sequence[Any]) -> Path:
    candidates = [args.tokenizer, args.base, args.to, args.from_] + [v.model_dir for v in variants]
    for c in candidates:
        if c and (Path(c) / "tokenizer.json").is_file():
            return Path(c)
    raise SystemExit("profile-sharing: no tokenizer.json in --tokenizer, --base or the variants' dirs")


def profile(args: argparse.Namespace) -> Any:
    """Measure the pair and return the SharingProfile (see the module docstring for the method)."""
    import torch

    from kvfleet.dataplane.kvsharing import ProfilePoint, SharingProfile
    from kvfleet.dataplane.model.kv_share import (
        capture_prefix,
        continuation_logits,
        load_variant,
        shared_prefix_cache,
    )
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    models: dict[str, Any] = {}
    a = load_variant(args.from_, args.base, models=models)
    b = load_variant(args.to, args.base, models=models)
    if (a.config.num_hidden_layers, a.config.kv_size) != (b.config.num_hidden_layers, b.config.kv_size):
        raise SystemExit("profile-sharing: the variants' KV shapes differ (not siblings of one base)")
    num_layers = b.config.num_hidden_layers
    tok_dir = _tokenizer_dir(args, (b, a))
    raw = Path(args.calibration).read_bytes()
    ids = Tokenizer.from_dir(tok_dir).encode(raw.decode())
    p, c = args.prompt_tokens, args.continuation_tokens
    starts = window_starts(len(ids), p + c, args.max_prompts)
    windows = [ids[s:s + p + c] for s in starts]
    log(f"profile-sharing: {args.from_variant} -> {args.to_variant}, {num_layers} layers, {len(windows)} windows "
        f"of {p}+{args.continuation_tokens} tokens (calibration {len(ids)} tokens), loaded in "
        f"{time.perf_counter() - started:.1f}s")

    prompts = []  # per window: (prefix [P], continuation [C], A's capture, Scorer)
    kl_sum = torch.zeros(num_layers, dtype=torch.float64)
    own_nll = []  # per window: B's own summed NLL
    for w, window in enumerate(windows):
        t0 = time.perf_counter()
        prefix, cont = torch.tensor(window[:p]), torch.tensor(window[p:])
        cap_a = capture_prefix(a.model, prefix, a.adapter)
        cap_b = capture_prefix(b.model, prefix, b.adapter)
        own = continuation_logits(b.model, cap_b.cache(), cont, p, b.adapter)  # [C, V]
        scorer = Scorer(own, cont[1:].to(own.device))
        own_nll.append(float(scorer.nll(own).double().sum()))
        for layer in range(num_layers):
            cache = cap_b.cache()
            cache.k[layer], cache.v[layer] = cap_a.k[layer], cap_a.v[layer]
            kl_sum[layer] += scorer.kl(continuation_logits(b.model, cache, cont, p, b.adapter)).double().sum()
        prompts.append((prefix, cont, cap_a, scorer))
        log(f"  scores: window {w + 1}/{len(windows)} ({time.perf_counter() - t0:.1f}s)")
    positions, nll_positions = len(windows) * c, len(windows) * (c - 1)
    scores = [float(x) / positions for x in kl_sum]

    curve, targets, window_nll, window_agree = [], [], [], []
    for n, plan in curve_plans(scores, args.max_fraction):
        t0 = time.perf_counter()
        sums = []  # per window: (summed NLL, agreements, KL)
        for prefix, cont, cap_a, scorer in prompts:
            cache = shared_prefix_cache(b.model, cap_a, prefix, plan, b.adapter)
            logits = continuation_logits(b.model, cache, cont, p, b.adapter)
            sums.append(tuple(float(f(logits).double().sum()) for f in (scorer.nll, scorer.agree, scorer.kl)))
        nll, agree, kl = (sum(col) for col in zip(*sums, strict=True))
        increase = math.exp((nll - sum(own_nll)) / nll_positions) - 1
        curve.append(ProfilePoint(plan, increase, agree / positions, kl / positions))
        targets.append(n)
        window_nll.append([(s[0] - o) / (c - 1) for s, o in zip(sums, own_nll, strict=True)])
        window_agree.append([s[1] / c for s in sums])
        log(f"  curve: n={n:<3} groups {layer_groups(plan)}  ppl {increase:+.4%}  agreement "
            f"{agree / positions:.3f}  KL {kl / positions:.4f} ({time.perf_counter() - t0:.1f}s)")

    extra = {"from": {"path": a.path, "modelDir": a.model_dir}, "to": {"path": b.path, "modelDir": b.model_dir},
             "base": str(Path(args.base).resolve()) if args.base else None, "tokenizer": str(tok_dir.resolve()),
             "calibrationFile": str(Path(args.calibration).resolve()), "calibrationFileTokens": len(ids),
             "settings": {"promptTokens": p, "continuationTokens": args.continuation_tokens,
                          "windows": len(windows), "maxPrompts": args.max_prompts, "maxFraction": args.max_fraction,
                          "maxGroups": MAX_GROUPS, "slack": SLACK, "dtype": "float32",
                          "threads": torch.get_num_threads()},
             "score": "mean KL(B own || B with A's KV in that layer only) over continuation positions, nats",
             "curveTargets": targets, "ownPerplexity": math.exp(sum(own_nll) / nll_positions),
             "perWindow": {"start": starts, "ownNll": [o / (c - 1) for o in own_nll],
                           "nllIncrease": window_nll, "tokenAgreement": window_agree},
             "versions": {"torch": torch.__version__, "python": platform.python_version()},
             "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
             "seconds": round(time.perf_counter() - started, 1)}
    return SharingProfile(
        from_variant=args.from_variant, to_variant=args.to_variant, family=args.family, num_layers=num_layers,
        from_weights=a.weights_id, to_weights=b.weights_id, calibration_sha256=hashlib.sha256(raw).hexdigest(),
        calibration_tokens=len(windows) * (p + c), quality_budget=args.budget,
        layer_scores=tuple(scores), curve=tuple(curve), extra=extra)


def table(prof: Any) -> str:
    """The curve as a Markdown table."""
    rows = ["| layers recomputed | groups | ppl increase | token agreement | KL (nats) |", "|---:|---|---:|---:|---:|"]
    for pt in prof.curve:
        groups = ", ".join(f"{i}" if i == j else f"{i}-{j}" for i, j in layer_groups(pt.layers)) or "none"
        rows.append(f"| {len(pt.layers)} | {groups} | {pt.ppl_increase:+.2%} | {pt.token_agreement:.3f} | "
                    f"{pt.kl_divergence:.4f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvfleet profile-sharing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="from_", required=True, help="sender A: HF model dir or PEFT adapter dir")
    ap.add_argument("--to", required=True, help="receiver B: HF model dir or PEFT adapter dir")
    ap.add_argument("--base", help="the base model dir (an adapter's base; an HF dir equal to it is the base)")
    ap.add_argument("--from-variant", required=True)
    ap.add_argument("--to-variant", required=True)
    ap.add_argument("--family", required=True)
    ap.add_argument("--calibration", required=True, help="a text file")
    ap.add_argument("--out", required=True, help="the profile JSON to write")
    ap.add_argument("--budget", type=float, default=0.01, help="largest relative perplexity change, either way "
                    "(default 0.01)")
    ap.add_argument("--max-fraction", type=float, default=0.25, help="most layers a plan recomputes (share)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--continuation-tokens", type=int, default=32)
    ap.add_argument("--max-prompts", type=int, default=8)
    ap.add_argument("--tokenizer", help="dir with tokenizer.json (default: --base or a variant's dir)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.continuation_tokens < 2 or args.prompt_tokens < 1 or args.max_prompts < 1:
        ap.error("need --prompt-tokens >= 1, --continuation-tokens >= 2, --max-prompts >= 1")
    if not 0 < args.max_fraction <= 1:
        ap.error("--max-fraction must be in (0, 1]")

    prof = profile(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(prof.to_json() + "\n")
    print(f"{args.from_variant} -> {args.to_variant}: top layers by score {prof.ranking()[:8]}")
    print(table(prof))
    plan = prof.plan(args.max_fraction)
    if plan is not None:
        print(f"recommended (max {args.max_fraction:.0%} of {prof.num_layers} layers): recompute {list(plan.layers)}: "
              f"ppl {plan.ppl_increase:+.2%}, agreement {plan.token_agreement:.3f} (within the "
              f"{prof.quality_budget:.1%} budget)")
    elif (close := prof.closest(args.max_fraction)) is not None:
        print(f"no plan of at most {args.max_fraction:.0%} of {prof.num_layers} layers keeps perplexity within "
              f"{prof.quality_budget:.1%} (the closest recomputes {list(close.layers)}: ppl {close.ppl_increase:+.2%}, "
              f"agreement {close.token_agreement:.3f}): the operator keeps sharing off for this pair")
    log(f"profile-sharing: wrote {out} in {prof.extra['seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
