"""Cache policies that compose: any codec x any eviction policy, behind `AttentionBackend`.

`PolicySpec` = `QuantSpec` (how KV is stored) + `EvictionSpec` (what is dropped),
parsed from a CachePolicy spec (camelCase YAML/JSON) or the engine's
`CachePolicyConfig`. `PolicyAttention` is a single-sequence backend that stores
each layer's KV as

    sinks (full precision) | body (codec, evictable) | tail (full precision residual)

Keys/values enter the tail; once `residual_tokens` follow a token group, that group is
encoded into the body (KIVI). Groups end at multiples of the group size (absolute positions, as
paged blocks do), so the first group after sinks that are not a multiple of it is partial. Eviction drops body
rows per kv head; sinks and tail are never evicted (they are protected along
with the eviction policy's own sinks and window). Attention of the tokens of
the current forward runs over [dequantized stored KV, their own fp K/V].

KVQuant's pre-RoPE keys (`keys_pre_rope`): the seam hands over post-RoPE keys
and no positions, so `PolicyAttention` counts positions itself (one sequence
from position 0), un-rotates keys with the model's rope table before encoding
and re-rotates them at their stored positions on read.

Engine integration (the paged engine applies a policy per variant): `paged_quant` stores the
same codecs in paged blocks (token-grouped scales per group of slots, full-precision lanes for
sinks and the residual tail, pre-RoPE keys) so a sequence reads exactly what `PolicyAttention`
reads. `paged_eviction.PagedEvictor` keeps ONE slot set per sequence (block tables are shared by
layers and heads) and applies StreamingLLM and layer/head-aggregated KeyDiff, H2O and SnapKV
(`paged_scores.py`); pyramid budgets are evaluated here only. Its hysteresis
(`EvictionSpec.slack_tokens`) is honoured here too, so both can be compared token for token.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..model.attention import AttentionBackend, causal_attention
from .eviction import PROMPT_SCORED, EvictionSpec, EvictionState, attention_probs, protected_mask, select_keep
from .paged_layout import tail_start
from .quant import KV_DTYPES, Codec, QuantBuffer, default_granularity

log = logging.getLogger(__name__)

# rope(positions [M]) -> (cos, sin) [M, D] or [M, 1, D] in the rotate-half convention
RopeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class QuantSpec:
    """How KV is stored (the CachePolicy `quantization` block)."""

    dtype: str = "none"
    key_granularity: str | None = None
    value_granularity: str | None = None
    group_size: int = 32
    residual_tokens: int = 0
    sink_tokens: int = 0
    keys_pre_rope: bool = False
    value_dtype: str | None = None  # None = same as dtype (the resource has one dtype; the engine may split)
    rotate_keys: bool = False  # keys quantized after a Hadamard rotation (`quant.hadamard_rotation`)

    def __post_init__(self) -> None:
        for dt in (self.dtype, self.value_dtype or self.dtype):
            if dt not in KV_DTYPES:
                raise ValueError(f"quantization.dtype {dt!r} not in {KV_DTYPES}")
        if self.residual_tokens < 0 or self.sink_tokens < 0 or self.group_size < 1:
            raise ValueError("quantization: residualTokens/sinkTokens must be >= 0 and groupSize >= 1")
        if self.keys_pre_rope and self.dtype in ("none", "fp16", "bf16"):
            raise ValueError("quantization.keysPreRope needs a quantized dtype (fp8, int8, int4, int3, int2)")
        if self.rotate_keys and self.dtype not in ("int8", "int4", "int3", "int2"):
            raise ValueError("quantization.rotateKeys needs an integer dtype (int8, int4, int3, int2)")

    def codecs(self, num_kv_heads: int, head_dim: int, fp_dtype: torch.dtype,
               evicting: bool = False) -> tuple[Codec, Codec]:
        """(key codec, value codec); raises ValueError on a combination the shapes do not allow.

        evicting: an eviction policy is on, so unset granularities default to per-token (eviction
        moves single tokens, which token-grouped scales cannot follow in a paged cache)."""
        vdt = self.value_dtype or self.dtype
        kg = self.key_granularity or default_granularity(self.dtype, "key", evicting)
        vg = self.value_granularity or default_granularity(vdt, "value", evicting)
        return (Codec(self.dtype, kg, self.group_size, num_kv_heads, head_dim, fp_dtype, self.rotate_keys),
                Codec(vdt, vg, self.group_size, num_kv_heads, head_dim, fp_dtype))


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", r"_\1", name).lower()


def _build(cls: type, raw: dict[str, Any] | None, where: str) -> Any:
    raw = {_snake(k): v for k, v in (raw or {}).items()}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    return cls(**raw)


@dataclass(frozen=True)
class PolicySpec:
    """A whole cache policy: quantization x eviction."""

    quant: QuantSpec = field(default_factory=QuantSpec)
    eviction: EvictionSpec = field(default_factory=EvictionSpec)
    name: str = "baseline"

    @classmethod
    def from_dict(cls, doc: dict[str, Any], name: str | None = None) -> PolicySpec:
        """A CachePolicy resource, or its `spec`, with camelCase or snake_case keys."""
        if "spec" in doc:
            name = name or (doc.get("metadata") or {}).get("name")
            doc = doc["spec"]
        return cls(quant=_build(QuantSpec, doc.get("quantization"), "quantization"),
                   eviction=_build(EvictionSpec, doc.get("eviction"), "eviction"),
                   name=name or "policy")

    @classmethod
    def from_config(cls, cfg: Any, name: str = "engine") -> PolicySpec:
        """From the engine's `CachePolicyConfig` (dataplane/config.py)."""
        return cls(
            quant=QuantSpec(cfg.key_quantization, cfg.key_granularity, cfg.value_granularity, cfg.group_size,
                            cfg.residual_tokens, cfg.quant_sink_tokens, cfg.keys_pre_rope,
                            value_dtype=None if cfg.value_quantization == cfg.key_quantization
                            else cfg.value_quantization, rotate_keys=cfg.rotate_keys),
            eviction=EvictionSpec(cfg.eviction, cfg.eviction_budget_tokens, cfg.eviction_budget_ratio,
                                  cfg.eviction_window_tokens, cfg.eviction_sink_tokens,
                                  cfg.observation_window, cfg.pooling_kernel, cfg.pyramid,
                                  # lookahead over token-grouped scales keeps whole groups (the engine moves
                                  # them with their scales)
                                  chunk_tokens=cfg.group_size if cfg.eviction == "lookahead" and (
                                      cfg.token_grouped("key") or cfg.token_grouped("value")) else 0),
            name=name)

    def codecs(self, num_kv_heads: int, head_dim: int, fp_dtype: torch.dtype) -> tuple[Codec, Codec]:
        """(key codec, value codec) of this policy (granularity defaults depend on eviction)."""
        return self.quant.codecs(num_kv_heads, head_dim, fp_dtype, evicting=self.eviction.enabled)

    @property
    def is_noop(self) -> bool:
        return self.quant.dtype == "none" and self.quant.value_dtype in (None, "none") \
            and not self.eviction.enabled

    def validate_for(self, num_kv_heads: int, head_dim: int, fp_dtype: torch.dtype = torch.float32) -> None:
        """Reject combinations that cannot work for this model, with a message naming the fields."""
        kc, vc = self.codecs(num_kv_heads, head_dim, fp_dtype)
        ev, q = self.eviction, self.quant
        if ev.enabled and ev.budget_tokens is not None:
            chunk = max(kc.chunk_tokens, vc.chunk_tokens)
            floor = max(ev.sink_tokens, q.sink_tokens) + max(ev.window_tokens, q.residual_tokens + chunk - 1)
            if ev.budget_tokens <= floor:
                raise ValueError(
                    f"eviction.budgetTokens {ev.budget_tokens} must exceed the tokens that are never evicted: "
                    f"max(eviction.sinkTokens, quantization.sinkTokens) + max(eviction.windowTokens, "
                    f"quantization.residualTokens + groupSize - 1) = {floor}")

    def kv_bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int,
                           fp_dtype: torch.dtype = torch.float32) -> float:
        """Steady-state codec bytes per token (K + V, all layers), before eviction."""
        kc, vc = self.codecs(num_kv_heads, head_dim, fp_dtype)
        return num_layers * (kc.bytes_per_token() + vc.bytes_per_token())


def build_codecs(spec: PolicySpec, num_kv_heads: int, head_dim: int,
                 fp_dtype: torch.dtype) -> tuple[Codec, Codec]:
    """Engine hook: the (key, value) codecs a block of this policy is stored with."""
    spec.validate_for(num_kv_heads, head_dim, fp_dtype)
    return spec.codecs(num_kv_heads, head_dim, fp_dtype)


def choose_slots(state: EvictionState, layer: int, keys: torch.Tensor, pos: torch.Tensor, seen: int,
                 budget: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Engine hook: rows to keep in one layer of one sequence.

    keys [N, Hkv, D] (post-RoPE, dequantized), pos [N, Hkv] positions, seen = tokens the sequence
    has had; fixed [N, Hkv] bool = rows the caller cannot drop. -> keep [min(N, budget), Hkv].
    """
    ev = state.spec
    prot = protected_mask(pos, seen, ev.sink_tokens, ev.window_tokens)
    if fixed is not None:
        prot = prot | fixed
    return select_keep(state.scores(layer, keys, pos), prot, budget)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class LayerKV:
    """One layer of one sequence: sinks | body (codec) | tail, with positions [N, Hkv]."""

    def __init__(self, kc: Codec, vc: Codec, sink_tokens: int, residual_tokens: int,
                 store_dtype: torch.dtype | None = None) -> None:
        self.kc, self.vc = kc, vc
        self.sinks, self.residual = sink_tokens, residual_tokens
        self.chunk = max(kc.chunk_tokens, vc.chunk_tokens)
        self.fp = kc.fp_dtype  # what attention reads
        self.store = store_dtype or kc.fp_dtype  # what the full-precision segments hold
        h, d = kc.num_heads, kc.head_dim
        empty = torch.empty(0, h, d, dtype=self.store)
        self.sink_k, self.sink_v = empty, empty  # [S, H, D]
        self.tail_k, self.tail_v = empty, empty  # [Nt, H, D]
        self.body_k, self.body_v = QuantBuffer(kc), QuantBuffer(vc)
        self.pos = torch.empty(0, h, dtype=torch.long)  # [N, H], order sinks | body | tail

    def __len__(self) -> int:
        return self.pos.shape[0]

    @property
    def n_sink(self) -> int:
        return self.sink_k.shape[0]

    @property
    def n_tail(self) -> int:
        return self.tail_k.shape[0]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v [n, H, D], pos [n]: sinks fill first, the rest goes to the tail, full groups get encoded."""
        take = min(self.sinks - self.n_sink, k.shape[0])
        k, v = k.to(self.store), v.to(self.store)
        if take > 0:
            self.sink_k = torch.cat([self.sink_k, k[:take]])
            self.sink_v = torch.cat([self.sink_v, v[:take]])
        self.tail_k = torch.cat([self.tail_k, k[take:]])
        self.tail_v = torch.cat([self.tail_v, v[take:]])
        self.pos = torch.cat([self.pos, pos[:, None].expand(-1, self.pos.shape[1])])
        if self.n_tail == 0:
            return
        p0 = int(self.pos[len(self) - self.n_tail, 0])  # the tail is never evicted: positions run on
        n = tail_start(p0 + self.n_tail, self.sinks, self.residual, self.chunk) - p0
        if n <= 0:
            return
        if self.chunk == 1:
            self.body_k.append(self.tail_k[:n])
            self.body_v.append(self.tail_v[:n])
        else:  # groups end at multiples of chunk (the first one after the sinks may be partial)
            s = 0
            while s < n:
                e = min(n, s + self.chunk - (p0 + s) % self.chunk)
                self.body_k.append(self.tail_k[s:e])
                self.body_v.append(self.tail_v[s:e])
                s = e
        self.tail_k, self.tail_v = self.tail_k[n:], self.tail_v[n:]

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored K, V [N, H, D] in the fp dtype (body dequantized)."""
        if len(self.body_k) == 0 and self.n_sink == 0:
            return self.tail_k.to(self.fp), self.tail_v.to(self.fp)
        parts_k = [self.sink_k.to(self.fp), self.body_k.decode(), self.tail_k.to(self.fp)]
        parts_v = [self.sink_v.to(self.fp), self.body_v.decode(), self.tail_v.to(self.fp)]
        return torch.cat(parts_k), torch.cat(parts_v)

    def fixed_rows(self) -> torch.Tensor:
        """[N, H] bool: rows in the full-precision segments (never evicted)."""
        n = len(self)
        rows = torch.arange(n)[:, None].expand(n, self.pos.shape[1])
        return (rows < self.n_sink) | (rows >= n - self.n_tail)

    def evict(self, keep: torch.Tensor) -> None:
        """keep [k, H] ascending rows, which include every sink and tail row."""
        s, t, k = self.n_sink, self.n_tail, keep.shape[0]
        body = keep[s:k - t] - s
        self.body_k.select(body)
        self.body_v.select(body)
        self.pos = self.pos.gather(0, keep)

    def nbytes(self) -> int:
        """KV bytes really allocated (positions are bookkeeping, see aux_nbytes)."""
        fp = sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.tail_k, self.tail_v))
        return fp + self.body_k.nbytes() + self.body_v.nbytes()


class PolicyAttention(AttentionBackend):
    """One sequence's KV under a cache policy. With the no-op policy it equals `DenseAttention` bit for bit.

    fp_store_dtype: what the full-precision parts (sinks, residual tail, dtype `none`) are stored as;
    None = the model dtype. E.g. bfloat16 for a float32 model on CPU, so the reference is a 16-bit
    cache as in deployment.
    rope: the model's rotary table, needed only for `keys_pre_rope` (KVQuant): keys are un-rotated
    before encoding and re-rotated at their stored positions on read. Positions are counted here
    (a single sequence starting at 0), which is all the seam needs.
    """

    def __init__(self, spec: PolicySpec, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, rope: RopeFn | None = None,
                 fp_store_dtype: torch.dtype | None = None) -> None:
        spec.validate_for(num_kv_heads, head_dim, dtype)
        if spec.eviction.policy in PROMPT_SCORED:
            raise ValueError(f"eviction {spec.eviction.policy!r} is scored by a trained module after the prompt: "
                             "the teacher-forced evaluator (kvfleet.tools.eval_tf) and the paged engine apply it")
        if spec.quant.keys_pre_rope and rope is None:
            raise ValueError("quantization.keysPreRope needs the model's rope table (pass rope=...)")
        self.spec, self.num_layers, self.rope = spec, num_layers, rope
        self.kc, self.vc = spec.codecs(num_kv_heads, head_dim, dtype)
        self.fp_store_dtype = None if fp_store_dtype == dtype else fp_store_dtype
        if self.fp_store_dtype is not None:
            cast = {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.fp_store_dtype]
            self.kc, self.vc = (replace(c, dtype=cast) if c.dtype == "none" else c for c in (self.kc, self.vc))
        self.layers: dict[int, LayerKV] = {}
        self.seen: dict[int, int] = {}
        self.evict_state = EvictionState(spec.eviction)

    def _rotate(self, k: torch.Tensor, pos: torch.Tensor, inverse: bool) -> torch.Tensor:
        """k [N, H, D] at pos [N, H] (or [N]) -> (un)rotated keys."""
        assert self.rope is not None
        p = pos if pos.dim() == 2 else pos[:, None].expand(-1, k.shape[1])
        cos, sin = self.rope(p.reshape(-1))
        cos = cos.view(*p.shape, -1).to(k.dtype)
        sin = sin.view(*p.shape, -1).to(k.dtype)
        return k * cos + _rotate_half(k) * (-sin if inverse else sin)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self._attend(layer, q, k, v, need_output=True)
        assert out is not None
        return out

    def ingest(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`attend` without computing the output: replays a recorded prefill into this policy.

        Exact for a first chunk: its own tokens attend at full precision whatever the policy, so the
        model's prefill forward is policy-independent; only what is stored and evicted differs.
        """
        self._attend(layer, q, k, v, need_output=False)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                need_output: bool) -> torch.Tensor | None:
        if layer not in self.layers:
            self.layers[layer] = LayerKV(self.kc, self.vc, self.spec.quant.sink_tokens,
                                         self.spec.quant.residual_tokens, self.fp_store_dtype)
            self.seen[layer] = 0
        st, start, t = self.layers[layer], self.seen[layer], q.shape[0]
        q_pos = torch.arange(start, start + t)
        n_past = len(st)
        if n_past == 0:
            k_all, v_all = k, v
        else:
            k_past, v_past = st.materialize()  # [Np, H, D]
            if self.spec.quant.keys_pre_rope:
                k_past = self._rotate(k_past, st.pos, inverse=False)
            k_all, v_all = torch.cat([k_past, k]), torch.cat([v_past, v])
        ev = self.evict_state
        probs = out = None
        if ev.needs_probs:
            visible = torch.ones(1, t, n_past + t, dtype=torch.bool)
            visible[0, :, n_past:] = torch.ones(t, t, dtype=torch.bool).tril()
            probs = attention_probs(q, k_all, visible)  # [Hq, T, Np+T]
            if need_output:
                hq, hkv = q.shape[1], k.shape[1]
                vh = v_all.float().permute(1, 0, 2).repeat_interleave(hq // hkv, dim=0)  # [Hq, Np+T, D]
                out = (probs @ vh).transpose(0, 1).to(q.dtype)
        elif need_output:
            out = causal_attention(q, k_all, v_all, q_offset=n_past)
        k_store = self._rotate(k, q_pos, inverse=True) if self.spec.quant.keys_pre_rope else k
        st.append(k_store, v, q_pos)
        self.seen[layer] = seen = start + t
        if ev.spec.enabled:
            ev.observe(layer, q, q_pos, probs, k.shape[1])
            self._maybe_evict(layer, st, k_all, seen)
        return out

    def _maybe_evict(self, layer: int, st: LayerKV, keys: torch.Tensor, seen: int) -> None:
        fixed = st.fixed_rows()
        ev = self.spec.eviction
        prot = protected_mask(st.pos, seen, ev.sink_tokens, ev.window_tokens) | fixed
        n_prot = int(prot.sum(0).max())
        budget = ev.layer_budget(layer, self.num_layers, seen, min_keep=n_prot)
        if len(st) <= budget:
            return
        keep = choose_slots(self.evict_state, layer, keys, st.pos, seen, ev.evict_to(budget, n_prot), fixed)
        st.evict(keep)
        self.evict_state.evicted(layer, keep)

    # -- accounting ---------------------------------------------------------

    def codec_bytes_per_token(self) -> float:
        """Steady-state bytes per token of this cache's codecs (K + V, all layers), before eviction."""
        return self.num_layers * (self.kc.bytes_per_token() + self.vc.bytes_per_token())

    def nbytes(self) -> int:
        """KV bytes allocated now, all layers."""
        return sum(st.nbytes() for st in self.layers.values())

    def aux_nbytes(self) -> int:
        """Bookkeeping that is not KV: positions and eviction state."""
        pos = sum(st.pos.numel() * st.pos.element_size() for st in self.layers.values())
        return pos + self.evict_state.nbytes()

    def tokens_stored(self) -> int:
        """Rows kept, summed over layers (per head rows are equal)."""
        return sum(len(st) for st in self.layers.values())

    def tokens_seen(self) -> int:
        return max(self.seen.values(), default=0)


class BatchedPolicyAttention(AttentionBackend):
    """Several sequences in one flat batch, each with its own `PolicyAttention` (never shared).

    Call `set_batch([(seq_id, n_tokens), ...])` in flat order before each forward.
    """

    def __init__(self, factory: Callable[[], PolicyAttention]) -> None:
        self.factory = factory
        self.seqs: dict[str, PolicyAttention] = {}
        self.batch: list[tuple[str, int]] = []

    def set_batch(self, batch: list[tuple[str, int]]) -> None:
        self.batch = list(batch)
        for sid, _ in batch:
            if sid not in self.seqs:
                self.seqs[sid] = self.factory()

    def release(self, seq_id: str) -> None:
        self.seqs.pop(seq_id, None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs, s = [], 0
        for sid, n in self.batch:
            outs.append(self.seqs[sid].attend(layer, q[s:s + n], k[s:s + n], v[s:s + n]))
            s += n
        if s != q.shape[0]:
            raise ValueError(f"set_batch covers {s} tokens, the forward has {q.shape[0]}")
        return torch.cat(outs)
