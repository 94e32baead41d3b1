"""Plain paged KV storage and the paged attention backend.

Storage (`PagedKVCache`, a `storage.KVStorage`): per layer one tensor for keys and one for values,
`[num_blocks, block_size, n_kv_heads, head_dim]` at the model dtype; slot `s` is
`(s // block_size, s % block_size)`. Block ids come from `blocks.BlockManager`.

Attention: the model hands each layer a flat batch of T tokens from many
sequences (see `model/attention.py`). The runner lays the batch out as

    [ decode group: Bd sequences with exactly 1 new token | prefill chunks, one after another ]

and sets a `PagedMetadata` once per step. For every layer the backend

1. writes the T new k/v rows into their slots (one `index_copy_` each);
2. decode group: ONE padded gather of all Bd block tables and ONE masked SDPA,
   with GQA done by folding the query group into the query-length axis
   (q `[Bd, Hkv, G, D]` against k `[Bd, Hkv, L, D]`; no K/V repeat);
3. prefill chunks: either per sequence, causal attention over its context
   (the chunk's own k/v when nothing is cached before it, else the gathered
   blocks), or — `PrefillBatch`, used on GPU where kernel launches cost more
   than padding — all chunks padded into ONE masked SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kvfleet.dataplane.model.attention import AttentionBackend, causal_attention

from .storage import KVStorage, PolicyStep


class PagedKVCache(KVStorage):
    """The KV tensors of all layers at the model dtype, indexed by block id: reads are exact."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(num_layers, num_blocks, block_size)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def parts(self, layer: int) -> list[torch.Tensor]:
        """[k, v] of the layer, each [num_blocks, block_size, Hkv, D]."""
        return [self.k[layer], self.v[layer]]

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [T] int64, k/v [T, Hkv, D] -> written into the layer's cache."""
        hkv, d = k.shape[1], k.shape[2]
        self.k[layer].view(-1, hkv, d).index_copy_(0, slots, k)
        self.v[layer].view(-1, hkv, d).index_copy_(0, slots, v)

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids [..., M] int64 -> k, v [..., M * block_size, Hkv, D] (a copy)."""
        k = self.k[layer][block_ids]  # [..., M, bs, Hkv, D]
        v = self.v[layer][block_ids]
        return k.flatten(-4, -3), v.flatten(-4, -3)


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens in the flat batch (not a decode)."""

    q_start: int  # offset in the flat batch
    q_len: int
    context_len: int  # tokens with KV after this step (= cached + q_len)
    block_ids: torch.Tensor | None  # [ceil(context_len / bs)] int64; None = no cached context


@dataclass
class PrefillBatch:
    """All prefill chunks of a step padded to [Bp, Lq] queries x [Bp, Mp * bs] keys.

    Padded query rows repeat their sequence's last real row (so no row is fully
    masked, which would make SDPA return NaN) and are dropped by `out_index`.
    """

    q_index: torch.Tensor  # [Bp, Lq] int64 rows of the flat batch
    block_tables: torch.Tensor  # [Bp, Mp] int64
    mask: torch.Tensor  # [Bp, 1, Lq, Mp * bs] bool, True = visible
    out_index: torch.Tensor  # [Tp] int64: padded row (b * Lq + i) of each real prefill token, flat order
    folded_mask: torch.Tensor | None = None  # [Bp, 1, G * Lq, Mp * bs], built by the first layer


@dataclass
class PagedMetadata:
    """Per-step layout of the flat batch, built once by the runner, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] int64
    num_decodes: int  # the first num_decodes tokens are one-token sequences
    decode_block_tables: torch.Tensor | None  # [Bd, M] int64, padded with block 0
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, M * bs] bool, True = visible
    prefills: list[PrefillChunk]
    prefill_batch: PrefillBatch | None = None  # set: attend all prefills at once instead of looping
    policy: PolicyStep | None = None  # the storage's step plan (`KVStorage.plan_step`; None when exact)
    scores: Any = None  # paged_scores.StepScores when the eviction policy needs attention (h2o, snapkv)
    decode_context_lens: torch.Tensor | None = None  # [Bd] int64: the mask's visible prefix per decode


class PagedAttention(AttentionBackend):
    """`AttentionBackend` over a `KVStorage`; call `set_metadata` before each forward.

    Without a step plan (`PagedMetadata.policy` None) it stores and gathers; with one it stores,
    reads with the plan's overlays plus the step's own K/V, then writes the lanes."""

    def __init__(self, cache: KVStorage) -> None:
        self.cache = cache
        self.meta: PagedMetadata | None = None
        # CPU kernels (`dataplane/kernels`): decode attention read straight from the blocks, no gather
        self.kernels: Any = None

    def set_metadata(self, meta: PagedMetadata) -> None:
        self.meta = meta

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        assert meta is not None, "PagedAttention.set_metadata() not called for this step"
        pol = meta.policy
        if meta.scores is not None:  # snapkv: keep the queries of observation windows
            meta.scores.observe(layer, q)
        if pol is None:
            self.cache.store(layer, meta.slot_mapping, k, v)
            return self._attend(layer, q, k, v, meta)
        k_stored = self.cache.store_step(layer, meta.slot_mapping, k, v, pol)
        out = self._attend(layer, q, k, v, meta)
        self.cache.write_lanes(layer, k_stored, v, pol)  # after the reads: they overlay the ring's old rows
        return out

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: PagedMetadata) -> torch.Tensor:
        pol = meta.policy
        outs: list[torch.Tensor] = []
        nd = meta.num_decodes
        if nd:
            outs.append(self._decode(layer, q[:nd], k[:nd], v[:nd], meta))
        if meta.prefill_batch is not None:
            outs.append(self._prefill_batched(layer, q, meta.prefill_batch))
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        for i, p in enumerate(meta.prefills):
            qs = q[p.q_start:p.q_start + p.q_len]  # [Tq, Hq, D]
            ks, vs = k[p.q_start:p.q_start + p.q_len], v[p.q_start:p.q_start + p.q_len]
            if p.block_ids is None:  # whole context is this chunk: no gather
                kc, vc = ks, vs
            elif pol is None:
                kc, vc = self.cache.gather(layer, p.block_ids)
                kc, vc = kc[:p.context_len], vc[:p.context_len]
            else:  # quantized: stored rows, full-precision lane rows, and this chunk's own K/V
                kc, vc = self.cache.read(layer, p.block_ids, pol.prefill_overlays[i], pol.prefill_positions[i])
                kc, vc = kc[:p.context_len], vc[:p.context_len]
                kc[p.context_len - p.q_len:], vc[p.context_len - p.q_len:] = ks, vs
            if meta.scores is not None and meta.scores.needs_probs:  # h2o: explicit softmax, scores kept
                outs.append(meta.scores.prefill(qs, kc, vc, p, meta.slot_mapping))
                continue
            outs.append(causal_attention(qs, kc, vc, q_offset=p.context_len - p.q_len))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: PagedMetadata) -> torch.Tensor:
        """q [Bd, Hq, D], k/v [Bd, Hkv, D] (the decodes' own new tokens) -> [Bd, Hq, D]."""
        assert meta.decode_block_tables is not None and meta.decode_mask is not None
        bd, hq, d = q.shape
        pol = meta.policy
        kernel = (self.kernels is not None and meta.scores is None and q.device.type == "cpu"
                  and meta.decode_context_lens is not None)
        if kernel and pol is None and isinstance(self.cache, PagedKVCache):  # straight from the blocks
            return self.kernels.paged_decode_attention(q, self.cache.k[layer], self.cache.v[layer],
                                                       meta.decode_block_tables, meta.decode_context_lens,
                                                       d ** -0.5)  # [Bd, Hq, D]
        if kernel and pol is not None:  # quantized: rows dequantized as the kernel reads them
            out = self.cache.fused_decode(self.kernels, layer, q, k, v, meta.decode_block_tables,
                                          meta.decode_context_lens, pol)
            if out is not None:
                return out
        if pol is None:
            kc, vc = self.cache.gather(layer, meta.decode_block_tables)  # [Bd, L, Hkv, D]
        else:  # quantized: + full-precision lane rows, and each decode's own token as computed
            kc, vc = self.cache.read(layer, meta.decode_block_tables, pol.decode_overlay, pol.decode_positions)
            assert pol.decode_own is not None
            kc.view(-1, *kc.shape[2:])[pol.decode_own] = k
            vc.view(-1, *vc.shape[2:])[pol.decode_own] = v
        hkv = kc.shape[2]
        if kernel and kc.dtype == q.dtype and kc.is_contiguous() and vc.is_contiguous():
            # the dequantized rows seen as blocks of one table per sequence: each attends its own length only
            bs = self.cache.block_size
            m = kc.shape[1] // bs
            tables = torch.arange(bd * m, device=q.device).view(bd, m)  # [Bd, M]
            return self.kernels.paged_decode_attention(q, kc.view(bd * m, bs, hkv, d), vc.view(bd * m, bs, hkv, d),
                                                       tables, meta.decode_context_lens, d ** -0.5)
        qg = q.view(bd, hkv, hq // hkv, d)  # [Bd, Hkv, G, D]: head h -> kv head h // G
        if meta.scores is not None and meta.scores.needs_probs:  # h2o: explicit softmax, scores kept
            return meta.scores.decode(qg, kc, vc, meta.decode_mask).reshape(bd, hq, d)
        out = F.scaled_dot_product_attention(qg, kc.transpose(1, 2), vc.transpose(1, 2),
                                             attn_mask=meta.decode_mask)  # [Bd, Hkv, G, D]
        return out.reshape(bd, hq, d)

    def _prefill_batched(self, layer: int, q: torch.Tensor, pb: PrefillBatch) -> torch.Tensor:
        bp, lq = pb.q_index.shape
        _, hq, d = q.shape
        kc, vc = self.cache.gather(layer, pb.block_tables)  # [Bp, Lk, Hkv, D]
        hkv = kc.shape[2]
        g = hq // hkv
        qp = q[pb.q_index]  # [Bp, Lq, Hq, D]
        qg = qp.view(bp, lq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(bp, hkv, g * lq, d)
        if pb.folded_mask is None:  # same for every layer: fold the query group once per step
            lk = pb.mask.shape[-1]
            pb.folded_mask = pb.mask[:, :, None].expand(bp, 1, g, lq, lk).reshape(bp, 1, g * lq, lk)
        sc = self.meta.scores if self.meta is not None else None
        if sc is not None and sc.needs_probs:  # h2o: explicit softmax, scores kept
            return sc.prefill_batched(qg, kc, vc, pb.folded_mask, pb.out_index)
        out = F.scaled_dot_product_attention(qg, kc.transpose(1, 2), vc.transpose(1, 2),
                                             attn_mask=pb.folded_mask)  # [Bp, Hkv, G * Lq, D]
        out = out.view(bp, hkv, g, lq, d).permute(0, 3, 1, 2, 4).reshape(bp * lq, hq, d)
        return out[pb.out_index]  # [Tp, Hq, D]
