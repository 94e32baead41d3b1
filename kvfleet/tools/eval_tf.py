"""Teacher forcing in one forward: each scored token reads KV exactly as `PolicyAttention` holds it.

A policy's cache changes only in known ways while a sequence is decoded one token at a time: the
token at position t reads rows 0..t-1 as stored after t tokens, i.e. sinks and the tail
[`tail_start(t)`, t) at full precision (16-bit store), the body [sinks, tail_start(t)) through the
codec (token groups end at multiples of the group size, so a body row's codes never change once
written), plus its own K/V unrounded. So one forward over the whole scored window, with per
(query, key) selection between the 16-bit rows and the codec's rows, gives the same logits as
stepwise decoding (`test_eval_tf` checks it against `PolicyAttention`), at the cost of one prefill.

Eviction is evaluated as prompt compression (the setting of the SnapKV and KeyDiff papers): once the
prompt is prefilled, each layer and kv head keeps `budget_ratio` of the prompt's rows (sinks, the
recent window and full-precision rows are protected; scores by the policy), and every decoded token
is kept. Continuous eviction during decode stays with the stepwise evaluator (`eval_cache.Runner`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kvfleet.dataplane.kvcache.eviction import (
    h2o_prompt_scores,
    keydiff_scores,
    pool_rows,
    select_chunks,
    select_keep,
    snapkv_scores,
    streaming_scores,
)
from kvfleet.dataplane.kvcache.paged_layout import tail_start
from kvfleet.dataplane.kvcache.policy import PolicySpec
from kvfleet.dataplane.kvcache.quant import Codec
from kvfleet.dataplane.model.attention import AttentionBackend, causal_attention

Q_CHUNK = 128  # queries per attention block (bounds the [Hq, Q, N] score tensors)
# a trained scorer of a recorded prompt: Prompt -> per layer [P, Hkv] (LookaheadKV; pooled here)
PromptScorer = Callable[["Prompt"], list[torch.Tensor]]


@dataclass
class Prompt:
    """A prefilled prompt: per layer post-RoPE k, v [P, Hkv, D], the last `window` queries [W, Hq, D]
    and, when recorded (`prefill(full_q=True)`, for H2O), every query [P, Hq, D]."""

    ids: list[int]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    q_win: list[torch.Tensor]
    logits: torch.Tensor  # [V] at the last prompt position
    q_all: list[torch.Tensor] | None = field(default=None)


class _Record(AttentionBackend):
    """Dense causal attention over an optional recorded prefix, keeping what a `Prompt` needs."""

    def __init__(self, prefix: Prompt | None, window: int, full_q: bool = False) -> None:
        self.prefix, self.window, self.full_q = prefix, window, full_q
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.q: list[torch.Tensor] = []
        self.q_all: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.prefix is not None:
            k = torch.cat([self.prefix.k[layer], k])
            v = torch.cat([self.prefix.v[layer], v])
            q_win = torch.cat([self.prefix.q_win[layer], q])[-self.window:]
        else:
            q_win = q[-self.window:]
        self.k.append(k)
        self.v.append(v)
        self.q.append(q_win)
        if self.full_q:
            assert self.prefix is None or self.prefix.q_all is not None, "prefix recorded without full_q"
            self.q_all.append(q if self.prefix is None else torch.cat([self.prefix.q_all[layer], q]))  # type: ignore[index]
        return causal_attention(q, k, v, q_offset=k.shape[0] - q.shape[0])


@torch.inference_mode()
def prefill(model: Any, ids: list[int], window: int = 32, prefix: Prompt | None = None,
            full_q: bool = False) -> Prompt:
    """Dense prefill of `ids` (policy-independent: a prompt's own tokens attend at full precision).
    prefix: a recorded `Prompt` whose ids start `ids` (only the rest is computed); full_q: keep every
    query (H2O's prompt scores need them)."""
    start = 0 if prefix is None else len(prefix.ids)
    assert prefix is None or ids[:start] == prefix.ids
    rec = _Record(prefix, window, full_q)
    hidden = model(torch.tensor(ids[start:]), torch.arange(start, len(ids)), rec)
    return Prompt(list(ids), rec.k, rec.v, rec.q, model.compute_logits(hidden[-1:])[0],
                  rec.q_all if full_q else None)


def cut(p: Prompt, n: int, window: int = 32) -> Prompt:
    """The first n tokens of a recorded prompt (logits unknown: zeros)."""
    return Prompt(p.ids[:n], [k[:n] for k in p.k], [v[:n] for v in p.v], [q[:0] for q in p.q_win],
                  torch.zeros_like(p.logits), None if p.q_all is None else [q[:n] for q in p.q_all])


def _rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    half = k.shape[-1] // 2
    rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return k * cos + rot * (-sin if inverse else sin)


class TeacherForced(AttentionBackend):
    """Scores positions P.. of one sequence in one forward over a recorded `Prompt` of P tokens."""

    def __init__(self, spec: PolicySpec, prompt: Prompt, rope: Any, dtype: torch.dtype = torch.float32,
                 fp_store: torch.dtype | None = torch.bfloat16, scorer: PromptScorer | None = None) -> None:
        hkv, d = prompt.k[0].shape[1:]
        self.spec, self.prompt, self.rope, self.fp_store, self.scorer = spec, prompt, rope, fp_store, scorer
        self.learned: list[torch.Tensor] | None = None  # the scorer's output, per layer [P, Hkv]
        self.select_s = 0.0  # seconds spent scoring and selecting the kept rows (all layers)
        self.kc, self.vc = spec.codecs(hkv, d, dtype)
        q = spec.quant
        self.sinks, self.resid = q.sink_tokens, q.residual_tokens
        self.chunk = max(self.kc.chunk_tokens, self.vc.chunk_tokens)
        self.quantized = self.kc.is_quantized or self.vc.is_quantized
        self.keep: list[torch.Tensor | None] = []  # per layer [Hkv, P] bool (prompt compression)

    # -- what each row reads as ----------------------------------------------------

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fp_store is None else x.to(self.fp_store).to(x.dtype)

    def _codec_rows(self, c: Codec, x: torch.Tensor) -> torch.Tensor:
        """x [N, H, D] (as the 16-bit tail held it) -> every row as the codec body reads it (groups
        at multiples of g)."""
        if not c.is_quantized:
            return self._store(x) if c.dtype == "none" else c.decode(c.encode(x))
        if not c.token_grouped:
            return c.decode(c.encode(x))
        g, n = c.group_size, x.shape[0]
        first = (self.sinks // g) * g
        pad = -(n - first) % g
        body = torch.cat([x[first:], x[-1:].expand(pad, *x.shape[1:])]).view(-1, g, *x.shape[1:])
        rows = torch.arange(first, n + pad).view(-1, g)
        valid = (rows >= self.sinks)[:, :, None, None]
        enc = c.encode(body, stats_from=torch.where(valid, body, body[:, -1:]))
        out = c.decode(enc).reshape(-1, *x.shape[1:])[:n - first]
        return torch.cat([x[:first], out])

    def _rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope(torch.arange(n))
        return cos.float(), sin.float()

    def _views(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ks, vs = self._store(k), self._store(v)
        if not self.quantized:
            return ks, vs, ks, vs
        if self.spec.quant.keys_pre_rope:  # stored un-rotated (16-bit rows too), rotated on read
            cos, sin = self._rope(k.shape[0])
            k_un = self._store(_rotate(k, cos, sin, True))
            ks = _rotate(k_un, cos, sin, False)
            kq = _rotate(self._codec_rows(self.kc, k_un), cos, sin, False)
        else:
            kq = self._codec_rows(self.kc, ks)
        return ks, vs, kq, self._codec_rows(self.vc, vs)

    def _compress(self, layer: int) -> torch.Tensor | None:
        """[Hkv, P] rows of the prompt kept under the eviction policy (None = all)."""
        ev, p = self.spec.eviction, self.prompt
        if not ev.enabled:
            return None
        k = p.k[layer]
        n, h = k.shape[:2]
        pos = torch.arange(n)[:, None].expand(n, h)
        tail = n - tail_start(n, self.sinks, self.resid, self.chunk) if self.quantized else 0
        prot = (pos < max(ev.sink_tokens, self.sinks)) | (pos >= n - max(ev.window_tokens, tail))
        budget = max(int(prot.sum(0).max()), ev.layer_budget(layer, len(p.k), n, 0))
        if budget >= n:
            return None
        t0 = time.perf_counter()
        if ev.policy == "lookahead":
            if self.scorer is None:
                raise ValueError("eviction lookahead needs the trained module (score(..., scorer=...))")
            if self.learned is None:  # one forward of the lookahead tokens scores every layer
                self.learned = self.scorer(self.stored_prompt())
            scores = pool_rows(self.learned[layer], ev.pooling_kernel)
        elif ev.policy == "h2o":
            if p.q_all is None:
                raise ValueError("eviction h2o needs every prompt query: prefill(..., full_q=True)")
            scores = h2o_prompt_scores(p.q_all[layer], k)
        elif ev.policy == "keydiff":
            scores = keydiff_scores(k)
        elif ev.policy == "snapkv":
            w = p.q_win[layer]
            scores = snapkv_scores(w, torch.arange(n - w.shape[0], n), k, pos, ev.pooling_kernel)
        elif ev.policy == "streaming-llm":
            scores = streaming_scores(pos)
        else:
            raise ValueError(f"eviction {ev.policy!r}: teacher forcing evaluates streaming-llm, snapkv, keydiff, "
                             "h2o, lookahead")
        idx = select_chunks(scores, prot, budget, ev.chunk_tokens) if ev.chunk_tokens > 1 else \
            select_keep(scores, prot, budget)  # [budget, Hkv]
        self.select_s += time.perf_counter() - t0
        return keep_mask(idx, n)

    def stored_prompt(self) -> Prompt:
        """The prompt's K/V as the paged engine's blocks hold them when it ends (every row through
        the codec, or 16-bit rows): what its LookaheadKV module reads, so both score the same rows."""
        p = self.prompt
        views = [self._views(k, v) for k, v in zip(p.k, p.v, strict=True)]
        k, v = ([x[0] for x in views], [x[1] for x in views]) if not self.quantized else \
            ([x[2] for x in views], [x[3] for x in views])
        return replace(p, k=k, v=v)

    def kept_prompt_rows(self) -> float:
        """Mean rows kept per layer and kv head of the prompt."""
        p = len(self.prompt.ids)
        return sum(p if m is None else float(m.sum(1).float().mean()) for m in self.keep) / max(1, len(self.keep))

    # -- attention -------------------------------------------------------------------

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per block of queries: one matmul over keys that are 16-bit rows or codec rows for the whole
        block, and both (selected per query) over the band where the tail boundary moves inside it."""
        p = self.prompt
        n0, t = p.k[layer].shape[0], q.shape[0]
        k_all, v_all = torch.cat([p.k[layer], k]), torch.cat([p.v[layer], v])
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        gq = hq // hkv
        ks, vs, kq, vq = self._views(k_all, v_all)
        if len(self.keep) <= layer:
            self.keep.append(self._compress(layer))
        keep = self.keep[layer]
        out = torch.empty_like(q)
        scale = 1.0 / math.sqrt(d)
        for c0 in range(0, t, Q_CHUNK):
            c1 = min(t, c0 + Q_CHUNK)
            n = n0 + c1  # keys any query of the block may see
            tpos = torch.arange(n0 + c0, n0 + c1)
            j = torch.arange(n)
            qh = q[c0:c1].float().view(c1 - c0, hkv, gq, d).permute(1, 2, 0, 3) * scale  # [Hkv, G, C, D]
            kh, vh = ks[:n].clone(), vs[:n].clone()  # 16-bit rows; codec rows below the tail
            lo = hi = self.sinks
            if self.quantized:
                ts = torch.clamp(torch.div(torch.clamp(tpos - self.resid, min=0), self.chunk,
                                           rounding_mode="floor") * self.chunk,
                                 min=torch.clamp(tpos, max=self.sinks))  # tail_start per query
                lo, hi = max(self.sinks, int(ts.min())), max(self.sinks, int(ts.max()))
                kh[self.sinks:lo], vh[self.sinks:lo] = kq[self.sinks:lo], vq[self.sinks:lo]
            s = qh @ kh.permute(1, 2, 0)[:, None]  # [Hkv, G, C, n]
            ar = torch.arange(c1 - c0)
            own_k = k_all[tpos].float().permute(1, 0, 2)[:, None]  # [Hkv, 1, C, D]: its own row, exact
            s[:, :, ar, tpos] = (qh * own_k).sum(-1)
            band = None
            if hi > lo:
                body = j[None, lo:hi] < ts[:, None]  # [C, band]: codec rows for these queries
                sq = qh @ kq[lo:hi].permute(1, 2, 0)[:, None]
                s[..., lo:hi] = torch.where(body, sq, s[..., lo:hi])
                band = body
            bias = torch.zeros(c1 - c0, n).masked_fill_(j[None, :] > tpos[:, None], float("-inf"))
            if keep is not None:
                drop = torch.zeros(hkv, n, dtype=torch.bool)
                drop[:, :n0] = ~keep
                s = s.masked_fill(drop[:, None, None, :], float("-inf"))
            probs = (s + bias).softmax(-1)
            o = probs @ vh.permute(1, 0, 2)[:, None]
            if band is not None:
                o = o + (probs[..., lo:hi] * band) @ (vq[lo:hi] - vs[lo:hi]).permute(1, 0, 2)[:, None]
            own_v = (v_all[tpos].float() - vs[tpos].float()).permute(1, 0, 2)[:, None]  # [Hkv, 1, C, D]
            o = o + probs[:, :, ar, tpos][..., None] * own_v
            out[c0:c1] = o.permute(2, 0, 1, 3).reshape(c1 - c0, hq, d).to(q.dtype)
        return out


def keep_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx [k, Hkv] kept rows (`select_keep`) -> [Hkv, n] bool mask of the prompt's kept rows."""
    keep = torch.zeros(idx.shape[1], n, dtype=torch.bool)
    keep.scatter_(1, idx.T, True)
    return keep


@torch.inference_mode()
def score(model: Any, spec: PolicySpec, prompt: Prompt, targets: list[int], rope: Any,
          fp_store: torch.dtype | None = torch.bfloat16,
          scorer: PromptScorer | None = None) -> tuple[torch.Tensor, TeacherForced]:
    """Per-token NLL [len(targets)] of `targets` following `prompt`, decoded under `spec` (teacher-forced).

    targets[0] is predicted by the prompt's own logits (the same under every policy); the rest by a
    forward of targets[:-1] through `TeacherForced`."""
    attn = TeacherForced(spec, prompt, rope, fp_store=fp_store, scorer=scorer)
    first = torch.log_softmax(prompt.logits.float(), -1)[targets[0]]
    if len(targets) == 1:
        return -first[None], attn
    start = len(prompt.ids)
    hidden = model(torch.tensor(targets[:-1]), torch.arange(start, start + len(targets) - 1), attn)
    logp = torch.log_softmax(model.compute_logits(hidden), -1)
    nll = -logp.gather(1, torch.tensor(targets[1:])[:, None])[:, 0]
    return torch.cat([-first[None], nll]), attn


@torch.inference_mode()
def greedy_matches(model: Any, spec: PolicySpec, prompt: Prompt, answer: list[int], rope: Any,
                   fp_store: torch.dtype | None = torch.bfloat16, scorer: PromptScorer | None = None) -> bool:
    """Whether greedy decoding under `spec` emits `answer` first: every teacher-forced argmax is right."""
    ok = int(prompt.logits.argmax()) == answer[0]
    if not ok or len(answer) == 1:
        return ok
    attn = TeacherForced(spec, prompt, rope, fp_store=fp_store, scorer=scorer)
    start = len(prompt.ids)
    hidden = model(torch.tensor(answer[:-1]), torch.arange(start, start + len(answer) - 1), attn)
    return bool((model.compute_logits(hidden).argmax(-1) == torch.tensor(answer[1:])).all())
