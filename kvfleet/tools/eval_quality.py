"""`kvfleet eval-cache` (default mode): policy quality with confidence intervals, teacher-forced.

Every input is prefilled once (policy-independent) and then scored under each policy in one forward
(`eval_tf`). Perplexity: Bible text and Python standard-library source, windows of 1k/2k/4k tokens
whose second half is scored; the change vs the 16-bit baseline comes from paired per-token NLL
differences with a block-bootstrap 95% interval. Retrieval: passkey (`--passkey-trials` depths per
length) and multi-fact (five facts per haystack, each asked), accuracy with Wilson intervals. KV
bytes per token at `--bytes-at` tokens, as the evaluator allocates them (`PolicyAttention`) and as
the paged engine would (`kv_storage_spec`: blocks of 16, scales, full-precision lanes, 16-bit).

Results are appended to a JSONL cache (`--cache`) keyed by input and policy fingerprint: a rerun
skips what is done (the baseline included), so a long grid can be stopped and resumed.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from kvfleet.dataplane.kvcache.eviction import PROMPT_SCORED
from kvfleet.dataplane.kvcache.policy import PolicyAttention, PolicySpec
from kvfleet.tools import eval_tasks as tasks
from kvfleet.tools.eval_tf import Prompt, PromptScorer, cut, greedy_matches, prefill, score

LATER_FIELDS = ("rotate_keys", "chunk_tokens")  # QuantSpec / EvictionSpec fields newer than the result cache


def fingerprint(spec: PolicySpec, scorer_id: str = "") -> str:
    """The cache key of a policy; a learned scorer's identity (`scorer_id`) is part of it."""
    # fields added later are left out at their default, so results cached before them stay valid
    q = {k: v for k, v in asdict(spec.quant).items() if not (k in LATER_FIELDS and not v)}
    e = {k: v for k, v in asdict(spec.eviction).items() if not (k in LATER_FIELDS and not v)}
    d: dict[str, Any] = {"q": q, "e": e}
    if spec.eviction.policy in PROMPT_SCORED:
        d["scorer"] = scorer_id
        d["scorer_reads"] = "stored"  # the rows as the cache holds them (`TeacherForced.stored_prompt`)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


class ResultCache:
    """Append-only JSONL of finished (input, policy) results.

    scorer_id: which trained module scores `lookahead` rows (its cache directory name), so a retrained
    module never reads another's results."""

    def __init__(self, path: Path | None, scorer_id: str = "") -> None:
        self.path, self.done, self.scorer_id = path, {}, scorer_id
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.done[(r["unit"], r["fp"])] = r

    def get(self, unit: str, spec: PolicySpec) -> dict[str, Any] | None:
        return self.done.get((unit, fingerprint(spec, self.scorer_id)))

    def put(self, unit: str, spec: PolicySpec, rec: dict[str, Any]) -> None:
        rec = {"unit": unit, "fp": fingerprint(spec, self.scorer_id), "policy": spec.name, **rec}
        self.done[(unit, rec["fp"])] = rec
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")


class Progress:
    """One line per input on stderr: done/total, elapsed, estimated time left."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.n, self.t0, self.quiet, self.worked = total, 0, time.monotonic(), quiet, 0

    def step(self, label: str, worked: bool) -> None:
        self.n += 1
        self.worked += worked
        if self.quiet:
            return
        el = time.monotonic() - self.t0
        left = el / max(1, self.worked) * (self.total - self.n) if self.worked else 0.0
        print(f"[eval-cache {self.n}/{self.total}] {label} {'ran' if worked else 'cached'}; "
              f"{el / 60:.1f} min elapsed, ~{left / 60:.1f} min left", file=sys.stderr, flush=True)


def _units(tok: Any, s: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(kind, unit id, payload) of every input, in a fixed order."""
    out: list[tuple[str, str, Any]] = []
    counts = {int(k): int(v) for k, v in s["ppl_seqs"].items()}
    texts = {"bible": tasks_bible, "python": tasks.python_text}
    for name in s["texts"]:
        ids = tok.encode(texts[name](), add_bos=False)
        for i, (length, w) in enumerate(tasks.windows(ids, counts)):
            out.append(("ppl", f"ppl/{name}/{length}/{i}", w))
    rng = random.Random(s["seed"])
    for length in s["passkey_lengths"]:
        for j in range(s["passkey_trials"]):
            key = str(rng.randint(10000, 99999))
            depth = (j + 0.5) / s["passkey_trials"]
            out.append(("passkey", f"passkey/{length}/{j}", tasks.passkey_ids(tok, length, depth, key)))
    bible = tok.encode(tasks_bible(), add_bos=False)
    for h in range(s["multifact_haystacks"]):
        hay, qa = tasks.multifact_ids(tok, bible, s["multifact_length"], rng)
        for i, (q, a) in enumerate(qa):
            out.append(("multifact", f"multifact/{s['multifact_length']}/{h}/{i}", (hay, q, a)))
    return out


def tasks_bible() -> str:
    from kvfleet.tools.eval_cache import bible_text

    return bible_text(max_chars=600_000)


def run(model: Any, tok: Any, policies: Sequence[PolicySpec], s: dict[str, Any], cache: ResultCache,
        quiet: bool = False, kinds: Sequence[str] | None = None, reverse: bool = False,
        scorer: PromptScorer | None = None) -> None:
    """Fill `cache` with every (input, policy) result not yet there.

    kinds: only inputs whose id starts with one of these (ppl, passkey/2048, ...); reverse: last first. The cache file
    is re-read before each input, so a second process working from the other end skips what the
    first has done. scorer: the trained module's prompt scorer for `lookahead` rows. Perplexity
    records keep `select_s`, the seconds a policy spent choosing the prompt rows it keeps."""
    def rope(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model.rotary.cos_sin(pos, torch.float32)

    units = [u for u in _units(tok, s) if kinds is None or any(u[1].startswith(k) for k in kinds)]
    if reverse:
        units.reverse()
    bar = Progress(len(units), quiet)
    shared: dict[Any, Prompt] = {}  # passkey fillers per length / multifact haystacks: prefilled once
    for kind, uid, payload in units:
        if cache.path is not None and cache.path.exists():
            cache.done.update(ResultCache(cache.path).done)
        todo = [p for p in policies if cache.get(uid, p) is None]
        if not todo:
            bar.step(uid, False)
            continue
        full_q = any(p.eviction.policy == "h2o" for p in todo)  # H2O's prompt scores read every query
        if kind == "ppl":
            half = len(payload) // 2
            pre = prefill(model, payload[:half], full_q=full_q)
            for p in todo:
                nll, attn = score(model, p, pre, payload[half:], rope, scorer=scorer)
                cache.put(uid, p, {"nll": [round(float(x), 5) for x in nll],
                                   "kept": attn.kept_prompt_rows() / half, "select_s": round(attn.select_s, 5)})
        else:
            if kind == "passkey":
                ids, n_before, answer, hay = payload
                key = ("passkey", len(hay), full_q)
                if key not in shared:
                    shared.clear()
                    shared[key] = prefill(model, hay, full_q=full_q)
                pre = prefill(model, ids, prefix=cut(shared[key], n_before), full_q=full_q)
            else:
                hay, q, answer = payload
                key = ("multifact", tuple(hay[:16]), len(hay), full_q)
                if key not in shared:
                    shared.clear()
                    shared[key] = prefill(model, hay, full_q=full_q)
                pre = prefill(model, hay + q, prefix=shared[key], full_q=full_q)
            for p in todo:
                cache.put(uid, p, {"ok": greedy_matches(model, p, pre, answer, rope, scorer=scorer)})
        bar.step(uid, True)


def kv_bytes(spec: PolicySpec, cfg: Any, n: int) -> tuple[float, float | None, str]:
    """(evaluator bytes/token, engine bytes/token or None, why not servable) for a context of n tokens.

    Evaluator: `PolicyAttention` (16-bit full-precision rows) after ingesting n tokens, really
    allocated. Engine: the paged cache at bfloat16 with blocks of 16: whole blocks for the kept tokens
    plus one sequence's lane (sinks, residual ring, sink stash) and scratch row."""
    from kvfleet.dataplane.config import CachePolicyConfig, ConfigError
    from kvfleet.dataplane.kvcache.build import kv_storage_spec

    L, h, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    q, e = spec.quant, spec.eviction
    # a learned scorer keeps as many rows as SnapKV at the same budget: account it as SnapKV
    acct = replace(spec, eviction=replace(e, policy="snapkv")) if e.policy in PROMPT_SCORED else spec
    attn = PolicyAttention(acct, L, h, d, torch.float32, rope=_identity_rope, fp_store_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for layer in range(L):
            k, v = torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g)
            attn.ingest(layer, torch.zeros(n, cfg.num_attention_heads, d), k, v)
    ev_bytes = attn.nbytes() / n
    try:
        cp = CachePolicyConfig(
            key_quantization=q.dtype, value_quantization=q.value_dtype or q.dtype, key_granularity=q.key_granularity,
            value_granularity=q.value_granularity, group_size=q.group_size, residual_tokens=q.residual_tokens,
            quant_sink_tokens=q.sink_tokens, keys_pre_rope=q.keys_pre_rope, rotate_keys=q.rotate_keys,
            eviction=e.policy, eviction_budget_tokens=e.budget_tokens, eviction_budget_ratio=e.budget_ratio,
            eviction_window_tokens=e.window_tokens, eviction_sink_tokens=e.sink_tokens,
            observation_window=e.observation_window, pooling_kernel=e.pooling_kernel, pyramid=e.pyramid,
            lookahead_dir="(the trained module)" if e.policy == "lookahead" else None)
        ks = kv_storage_spec(cp, L, 16, h, d, torch.bfloat16, num_lanes=1)
    except (ConfigError, ValueError) as err:
        return ev_bytes, None, str(err).split(":")[0]
    if PolicySpec.from_config(cp).eviction.chunk_tokens != e.chunk_tokens:
        return ev_bytes, None, "the engine's lookahead keeps whole token groups under token-grouped scales"
    rows = len(attn.layers[0]) if e.enabled else n
    return ev_bytes, (-(-rows // 16) * ks.bytes_per_block + ks.lane_bytes) / n, ""


def _identity_rope(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = 64
    return torch.ones(pos.shape[0], d), torch.zeros(pos.shape[0], d)


def summarize(policies: Sequence[PolicySpec], s: dict[str, Any], cache: ResultCache, cfg: Any) -> dict[str, Any]:
    """The report: per policy bytes, perplexity change with intervals (overall, per text, per length),
    retrieval accuracies with intervals."""
    from kvfleet.tools.eval_tasks import bootstrap_delta, wilson

    units: dict[str, list[str]] = {}
    for (uid, _fp), _r in cache.done.items():
        units.setdefault(uid.split("/")[0], [])
        if uid not in units[uid.split("/")[0]]:
            units[uid.split("/")[0]].append(uid)
    base = policies[0]
    ref16 = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    rows = []
    for p in policies:
        ev_b, eng_b, why = kv_bytes(p, cfg, s["bytes_at"])
        diffs: dict[str, list[torch.Tensor]] = {}
        n_tok, kept, sel = 0, [], {}
        for uid in units.get("ppl", []):
            r, b = cache.get(uid, p), cache.get(uid, base)
            if r is None or b is None:
                continue
            d = torch.tensor(r["nll"][1:], dtype=torch.float64) - torch.tensor(b["nll"][1:], dtype=torch.float64)
            _, text, length, _ = uid.split("/")
            for k in ("all", text, f"@{length}"):
                diffs.setdefault(k, []).append(d)
            n_tok += d.numel()
            kept.append(r["kept"])
            if "select_s" in r:
                sel.setdefault(length, []).append(r["select_s"])
        ppl = {k: bootstrap_delta(v) for k, v in diffs.items()}
        acc: dict[str, tuple[float, float, float, int]] = {}
        for kind in ("passkey", "multifact"):
            got: dict[str, list[bool]] = {}
            for uid in units.get(kind, []):
                r = cache.get(uid, p)
                if r is not None:
                    got.setdefault(uid.split("/")[1], []).append(r["ok"])
            for length, oks in got.items():
                acc[f"{kind}@{length}"] = (*wilson(sum(oks), len(oks)), len(oks))
        rows.append({"policy": p.name, "quantization": asdict(p.quant), "eviction": asdict(p.eviction),
                     "kv_bytes_per_token": ev_b, "engine_bytes_per_token": eng_b, "engine_refuses": why,
                     "x_vs_16bit": ref16 / ev_b, "scored_tokens": n_tok,
                     "prompt_kept": sum(kept) / len(kept) if kept else None,
                     "select_ms": {f"@{k}": 1000 * sum(v) / len(v) for k, v in sel.items()},
                     "ppl_delta_pct": ppl, "accuracy": acc,
                     "within_bar": bool(ppl and ppl["all"][2] <= 2.0)})
    return {"kv_bytes_per_token_16bit": ref16, "settings": s, "results": rows}


def fmt_ci(t: Sequence[float] | None, pct: bool = True) -> str:
    if t is None:
        return "n/a"
    return f"{t[0]:+.2f} [{t[1]:+.2f}, {t[2]:+.2f}]" if pct else f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lens = [f"@{n}" for n in s["ppl_seqs"]]
    acc_cols = [f"passkey@{n}" for n in s["passkey_lengths"]] + [f"multifact@{s['multifact_length']}"]
    head = (["policy", "B/token (eval)", "B/token (engine)", "x vs 16-bit", "Δppl% [95% CI]"] + s["texts"]
            + lens + acc_cols + ["≤ +2%"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        d = r["ppl_delta_pct"]
        eng = f"{r['engine_bytes_per_token']:.0f}" if r["engine_bytes_per_token"] else "not servable"
        cells = [r["policy"], f"{r['kv_bytes_per_token']:.0f}", eng, f"{r['x_vs_16bit']:.2f}",
                 fmt_ci(d.get("all"))]
        cells += [f"{d[k][0]:+.2f} [{d[k][1]:+.2f}, {d[k][2]:+.2f}]" if k in d else "n/a"
                  for k in [*s["texts"], *lens]]
        cells += [f"{r['accuracy'][c][0]:.2f} [{r['accuracy'][c][1]:.2f}, {r['accuracy'][c][2]:.2f}] "
                  f"n={r['accuracy'][c][3]}" if c in r["accuracy"] else "n/a" for c in acc_cols]
        cells.append("yes" if r["within_bar"] else "no")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


DEFAULTS: dict[str, Any] = {
    "texts": ["bible", "python"], "ppl_seqs": {"1024": 4, "2048": 3, "4096": 2},
    "passkey_lengths": [1024, 2048, 4096], "passkey_trials": 20, "multifact_haystacks": 4,
    "multifact_length": 2048, "bytes_at": 4096, "seed": 0,
}


def add_args(ap: Any) -> None:
    """The teacher-forced mode's options (on `kvfleet eval-cache`'s parser)."""
    ap.add_argument("--texts", default=",".join(DEFAULTS["texts"]), help="perplexity texts: bible,python")
    ap.add_argument("--ppl-seqs", default="1024:4,2048:3,4096:2",
                    help="windows per text, LENGTH:COUNT,...; the second half of each is scored")
    ap.add_argument("--passkey-lengths", default="1024,2048,4096")
    ap.add_argument("--passkey-trials", type=int, default=DEFAULTS["passkey_trials"],
                    help="needle depths per length, evenly spread")
    ap.add_argument("--multifact-haystacks", type=int, default=DEFAULTS["multifact_haystacks"],
                    help="haystacks of five facts each (every fact is asked)")
    ap.add_argument("--multifact-length", type=int, default=DEFAULTS["multifact_length"])
    ap.add_argument("--bytes-at", type=int, default=DEFAULTS["bytes_at"], help="context length of the KV bytes")
    ap.add_argument("--cache", type=Path, default=None,
                    help="JSONL of finished results to resume from (default: OUT/eval-cache.jsonl)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--lookahead", type=Path, default=None,
                    help="a trained LookaheadKV module for `lookahead` policies (default: `kvfleet "
                         "train-lookahead`'s for the model, trained on first use)")


def settings_from(a: Any) -> dict[str, Any]:
    return {"texts": a.texts.split(","),
            "ppl_seqs": {k: int(v) for k, v in (x.split(":") for x in a.ppl_seqs.split(","))},
            "passkey_lengths": [int(x) for x in a.passkey_lengths.split(",")], "passkey_trials": a.passkey_trials,
            "multifact_haystacks": a.multifact_haystacks, "multifact_length": a.multifact_length,
            "bytes_at": a.bytes_at, "seed": a.seed}


def evaluate(model_dir: Path, policies: Sequence[PolicySpec], s: dict[str, Any], cache: ResultCache,
             quiet: bool = False, lookahead_dir: Path | None = None, **run_kw: Any) -> dict[str, Any]:
    """Run (or resume) every input under every policy; the report (`summarize`) with machine facts.

    lookahead_dir: a trained LookaheadKV module (`kvfleet train-lookahead`) for `lookahead` rows."""
    from kvfleet.dataplane.model.loader import load_model
    from kvfleet.dataplane.model.tokenizer import Tokenizer
    from kvfleet.tools.eval_cache import machine_info

    model, cfg = load_model(model_dir, dtype="float32", device="cpu")
    tok = Tokenizer.from_dir(model_dir)
    for p in policies:
        p.validate_for(cfg.num_key_value_heads, cfg.head_dim)
    if lookahead_dir is not None:
        from kvfleet.dataplane.kvcache.lookahead import LookaheadKV

        mod = LookaheadKV.load(lookahead_dir, cfg)
        run_kw["scorer"] = lambda p: mod.mass(model, p.k, p.v)
    t0 = time.monotonic()
    run(model, tok, policies, s, cache, quiet, **run_kw)
    report = summarize(policies, s, cache, cfg)
    report["machine"] = {**machine_info(), "wall_s_this_run": time.monotonic() - t0}
    return report


def main(a: Any, policies: Sequence[PolicySpec], model_dir: Path) -> int:
    s = settings_from(a)
    cache_path = a.cache or (a.out / "eval-cache.jsonl" if a.out is not None else None)
    la = a.lookahead
    if la is None and any(p.eviction.policy in PROMPT_SCORED for p in policies):
        from kvfleet.tools.lookahead_train import lookahead_dir

        la = lookahead_dir(model_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    report = evaluate(model_dir, policies, s, ResultCache(cache_path, la.name if la else ""), a.quiet, la)
    report["model"] = a.model
    print(table(report))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "eval-cache.json").write_text(json.dumps(report, indent=2, default=str))
        (a.out / "eval-cache.md").write_text(f"# KV cache policies (teacher-forced)\n\n{table(report)}\n")
        print(f"wrote {a.out / 'eval-cache.json'} and {a.out / 'eval-cache.md'}")
    return 0
