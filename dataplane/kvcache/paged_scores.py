"""Attention-based eviction scores for the paged engine: the AGGREGATED variant of H2O and SnapKV.

The paged engine keeps ONE kept-token set per sequence (block tables are shared by all layers and
kv heads), so a token's score is the per-(layer, kv head) score of `eviction.py` summed over layers
and kv heads (and, as there, over each kv head's GQA group of query heads):

    h2o     `PagedScores.acc` [num_blocks * block_size] float32, one score per cache slot: the
            attention the token in that slot received from every query of every step (prefill
            chunks and decodes), summed over layers and heads. A slot is zeroed when the step that
            writes it is planned; compaction moves scores with their slots (`move`). While h2o is on,
            attention is an explicit softmax(q k^T / sqrt(D)) (`decode`, `prefill`, `prefill_batched`);
            every other policy keeps the fused SDPA path.
    snapkv  per sequence and layer, the last `observation_window` queries (post-RoPE) and their
            positions, captured by `observe` (attention stays fused SDPA). At compaction
            `PagedEvictor` scores the stored keys with `eviction.snapkv_scores` per layer and sums
            the pooled votes over layers and kv heads. A snapkv sequence is not compacted before
            its whole prompt is computed, so its first eviction is scored by the last W prompt
            queries over the whole prompt, however the prompt was chunked.

Per step the runner calls `PagedScores.plan(items, meta)` -> `StepScores` (set as `PagedMetadata.scores`);
`PagedAttention` calls it per layer. Shared blocks (prefix-cache hits) share their slots' scores; such
slots are never evicted (`PagedEvictor.fixed_slots`), so only SnapKV's pooling can see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .eviction import EvictionSpec, attention_probs, received_attention

if TYPE_CHECKING:
    from .paged import PagedMetadata, PrefillChunk

ATTENTION_SCORED = ("h2o", "snapkv")  # policies that need this module


def probs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention, float32, in SDPA's layout.

    q [B, Hkv, R, D], k/v [B, Hkv, L, D], mask [B, 1, R, L] bool (True = visible)
    -> out [B, Hkv, R, D] (q's dtype), probs [B, Hkv, R, L] float32.
    """
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, Hkv, R, L]
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v.float()).to(q.dtype), probs


@dataclass
class StepScores:
    """One step's view of `PagedScores`: what `PagedAttention` calls per layer (see `plan`)."""

    owner: PagedScores
    needs_probs: bool
    decode_slots: torch.Tensor | None = None  # h2o: [Bd, Md * bs] cache slot of each decode key column
    batch_slots: torch.Tensor | None = None  # h2o: [Bp, Mp * bs] same for the padded prefill batch
    batch_rows: torch.Tensor | None = None  # h2o: [Bp, Lq] float32, 1 = real query row, 0 = padding
    rows: torch.Tensor | None = None  # snapkv: [R] int64 flat-batch rows whose queries may vote
    owners: list[tuple[str, int, int]] = field(default_factory=list)  # snapkv: (seq_id, first pos, n rows)
    q: list[torch.Tensor | None] = field(default_factory=list)  # snapkv: per layer [R, Hq, D]

    def observe(self, layer: int, q: torch.Tensor) -> None:
        """q [T, Hq, D] of the flat batch: keep the rows that may fall in an observation window."""
        if self.rows is not None:
            self.q[layer] = q.index_select(0, self.rows)

    def decode(self, qg: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """qg [Bd, Hkv, G, D], kc/vc [Bd, L, Hkv, D], mask [Bd, 1, 1, L] -> out [Bd, Hkv, G, D]; scores added."""
        assert self.decode_slots is not None
        out, probs = probs_attention(qg, kc.transpose(1, 2), vc.transpose(1, 2), mask)
        self.owner.add(self.decode_slots, probs.sum((1, 2)))  # [Bd, L]: over kv heads and the group
        return out

    def prefill(self, qs: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, p: PrefillChunk,
                slot_mapping: torch.Tensor) -> torch.Tensor:
        """One chunk: qs [Tq, Hq, D] over its context kc/vc [C, Hkv, D] (causal) -> out [Tq, Hq, D]."""
        tq, hq, _ = qs.shape
        c, hkv = kc.shape[0], kc.shape[1]
        off = p.context_len - p.q_len
        visible = torch.arange(c, device=qs.device)[None, :] <= off + torch.arange(tq, device=qs.device)[:, None]
        probs = attention_probs(qs, kc, visible[None])  # [Hq, Tq, C], as PolicyAttention computes it
        vh = vc.float().permute(1, 0, 2).repeat_interleave(hq // hkv, dim=0)  # [Hq, C, D]
        out = (probs @ vh).transpose(0, 1).to(qs.dtype)  # [Tq, Hq, D]
        if p.block_ids is None:  # the context is the chunk itself
            slots = slot_mapping[p.q_start:p.q_start + p.q_len]
        else:
            slots = self.owner.grid(p.block_ids[None])[0, :c]
        self.owner.add(slots, received_attention(probs, hkv).sum(1))  # [C]
        return out

    def prefill_batched(self, qg: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, folded_mask: torch.Tensor,
                        out_index: torch.Tensor) -> torch.Tensor:
        """qg [Bp, Hkv, G * Lq, D], kc/vc [Bp, Lk, Hkv, D], folded_mask [Bp, 1, G * Lq, Lk] -> [Tp, Hq, D]."""
        assert self.batch_slots is not None and self.batch_rows is not None
        bp, hkv, glq, d = qg.shape
        lq = self.batch_rows.shape[1]
        g = glq // lq
        out, probs = probs_attention(qg, kc.transpose(1, 2), vc.transpose(1, 2), folded_mask)
        real = probs.view(bp, hkv, g, lq, -1) * self.batch_rows[:, None, None, :, None]  # padded rows vote 0
        self.owner.add(self.batch_slots, real.sum((1, 2, 3)))  # [Bp, Lk]
        out = out.view(bp, hkv, g, lq, d).permute(0, 3, 1, 2, 4).reshape(bp * lq, hkv * g, d)
        return out[out_index]


class PagedScores:
    """Pool-wide H2O scores per cache slot, or SnapKV observation windows per sequence."""

    def __init__(self, spec: EvictionSpec, num_slots: int, block_size: int, num_layers: int,
                 device: torch.device | str) -> None:
        assert spec.policy in ATTENTION_SCORED, spec.policy
        self.spec, self.bs, self.num_layers = spec, block_size, num_layers
        self.device = torch.device(device)
        self.needs_probs = spec.policy == "h2o"
        self.acc = torch.zeros(num_slots if self.needs_probs else 0, dtype=torch.float32, device=device)
        self.windows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # seq -> (q [L, <=W, Hq, D], pos [<=W])
        self._pending: StepScores | None = None
        self._span = torch.arange(block_size, device=device)

    def grid(self, tables: torch.Tensor) -> torch.Tensor:
        """Block tables [B, M] -> cache slots [B, M * bs] (slot = block * bs + offset)."""
        return (tables[:, :, None] * self.bs + self._span).flatten(1)

    def add(self, slots: torch.Tensor, got: torch.Tensor) -> None:
        """slots/got [...] same shape: accumulate attention received into the slots (duplicates add)."""
        self.acc.index_add_(0, slots.reshape(-1), got.reshape(-1))

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Compaction moved the tokens in cache slots src [k] to dst [k]: their scores follow."""
        if self.needs_probs:
            self.acc[dst] = self.acc[src]

    def plan(self, items: list[Any], meta: PagedMetadata) -> StepScores:
        """Before a forward: items are the runner's `ScheduledSeq`s in flat-batch order."""
        self.flush()
        step = StepScores(self, self.needs_probs)
        if self.needs_probs:
            self.acc.index_fill_(0, meta.slot_mapping, 0.0)  # new tokens start with no attention received
            if meta.decode_block_tables is not None:
                step.decode_slots = self.grid(meta.decode_block_tables)
            pb = meta.prefill_batch
            if pb is not None:
                step.batch_slots = self.grid(pb.block_tables)
                rows = torch.zeros(pb.q_index.numel(), dtype=torch.float32, device=self.device)
                step.batch_rows = rows.index_fill_(0, pb.out_index, 1.0).view(pb.q_index.shape)
            return step
        w, rows, off = self.spec.observation_window, [], 0
        for it in items:
            n = it.num_new_tokens
            take = min(n, w)
            rows.extend(range(off + n - take, off + n))
            step.owners.append((it.seq.seq_id, it.start + n - take, take))
            off += n
        step.rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        step.q = [None] * self.num_layers
        self._pending = step
        return step

    def flush(self) -> None:
        """Append the last step's captured queries to each sequence's window (snapkv)."""
        step, self._pending = self._pending, None
        if step is None or any(q is None for q in step.q):
            return
        qs = torch.stack(step.q)  # type: ignore[arg-type]  # [L, R, Hq, D]
        w, r = self.spec.observation_window, 0
        for sid, first, n in step.owners:
            new_q, new_pos = qs[:, r:r + n], torch.arange(first, first + n, device=self.device)
            r += n
            old = self.windows.get(sid)
            if old is not None:
                keep = old[1] < first  # a recomputed (preempted) sequence replaces what it recomputes
                new_q, new_pos = torch.cat([old[0][:, keep], new_q], 1), torch.cat([old[1][keep], new_pos])
            self.windows[sid] = (new_q[:, -w:], new_pos[-w:])

    def window(self, seq_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """snapkv: the sequence's last queries per layer [L, <=W, Hq, D] and their positions [<=W]."""
        self.flush()
        return self.windows[seq_id]

    def release(self, seq_id: str) -> None:
        """The sequence is finished: forget its window (after placing the last step's queries)."""
        self.flush()
        self.windows.pop(seq_id, None)

    def nbytes(self) -> int:
        """Bookkeeping bytes (not KV)."""
        ts = [self.acc] + [t for pair in self.windows.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in ts)
