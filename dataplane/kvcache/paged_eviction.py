"""Token eviction for the paged engine: one kept-token set per sequence, compacted in place.

Block tables are per sequence and shared by all layers, so the paged engine keeps ONE set of
token slots per sequence (all layers, all kv heads), chosen by a policy that needs no attention
weights (the fused SDPA path never materializes them):

    streaming-llm  score = position                       (sinks + most recent window)
    keydiff        score = sum over layers and kv heads of -cos(key, mean key of that head)

Sinks and the recent window are always kept (`eviction.protected_mask`), and so are slots in
blocks this sequence does not own exclusively: prefix-cache hits it took at admission and any
block with refcount > 1. After a step, when a sequence's PHYSICAL KV length (slots used) exceeds
its budget, `PagedEvictor.maybe_compact` copies the kept slots to the front of its blocks (k and
v of every layer, every storage tensor, so quantized `PagedQuantKV` codes and per-slot scales
move with them), drops the prefix-cache registration of every block it wrote (its contents no
longer match its hash) and frees the now-unused tail blocks.

The LOGICAL position of the next token stays `num_computed_tokens` (keys carry RoPE, so kept keys
keep their positions); `Sequence.num_evicted` is the difference between the two.

NOTE: h2o/snapkv need attention probabilities and `pyramid` needs per-layer block tables;
`CachePolicyConfig.check_servable` rejects them (PolicyAttention evaluates all of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..engine.sequence import Sequence
from .blocks import BlockManager
from .eviction import EvictionSpec, keydiff_scores, protected_mask, select_keep, streaming_scores


@dataclass
class EvictionStats:
    """Counters since the engine started."""

    compactions: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0


def _parts(store: Any) -> list[torch.Tensor]:
    """A layer's storage as a list of [num_blocks, block_size, Hkv, X] tensors (plain or quantized)."""
    return list(store) if isinstance(store, list | tuple) else [store]


class PagedEvictor:
    """Chooses and compacts each sequence's kept slots in a paged KV cache (`PagedKVCache` or `PagedQuantKV`)."""

    def __init__(self, spec: EvictionSpec, kv: Any, bm: BlockManager) -> None:
        self.spec, self.kv, self.bm = spec, kv, bm
        self.bs = bm.block_size
        self.stats = EvictionStats()

    # -- what a sequence holds ---------------------------------------------------

    @staticmethod
    def slot_positions(seq: Sequence) -> list[int]:
        """Logical position of each physical slot (len = num_kv_slots)."""
        kept = seq.kept_positions or []
        n = seq.num_kv_slots
        return kept[:n] + list(range(len(kept) + seq.num_evicted, n + seq.num_evicted))

    def fixed_slots(self, seq: Sequence, n: int) -> torch.Tensor:
        """[n] bool: slots in blocks this sequence does not own exclusively (never moved or dropped)."""
        rc = self.bm.ref_counts
        fixed = torch.zeros(n, dtype=torch.bool)
        for i, b in enumerate(seq.block_table[:-(-n // self.bs)]):
            if i < seq.num_hit_blocks or rc[b] > 1:
                fixed[i * self.bs:(i + 1) * self.bs] = True
        return fixed[:n]

    def _slots(self, seq: Sequence, idx: torch.Tensor) -> torch.Tensor:
        """Physical slot indices [k] -> cache slots [k] int64."""
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[idx // self.bs] * self.bs + idx % self.bs

    def keys(self, seq: Sequence, n: int) -> list[torch.Tensor]:
        """Per layer: the sequence's first n stored keys [n, Hkv, D] (dequantized)."""
        blocks = torch.tensor(seq.block_table[:-(-n // self.bs)], dtype=torch.long, device=self._device())
        return [self.kv.gather(layer, blocks)[0][:n] for layer in range(self.kv.num_layers)]

    def _device(self) -> torch.device:
        return _parts(self.kv.k[0])[0].device

    def choose(self, seq: Sequence) -> torch.Tensor | None:
        """Ascending physical slot indices [k] to keep, or None while within budget."""
        n, seen = seq.num_kv_slots, seq.num_computed_tokens
        pos = torch.tensor(self.slot_positions(seq), dtype=torch.long)  # [n]
        ev = self.spec
        prot = protected_mask(pos[:, None], seen, ev.sink_tokens, ev.window_tokens)[:, 0] | self.fixed_slots(seq, n)
        budget = ev.layer_budget(0, 1, seen, min_keep=int(prot.sum()))
        if n <= budget:
            return None
        if ev.policy == "streaming-llm":
            scores = streaming_scores(pos[:, None])  # [n, 1]
        else:  # keydiff, aggregated over layers and kv heads: one set for the whole sequence
            per_layer = torch.stack([keydiff_scores(k).sum(1) for k in self.keys(seq, n)])  # [L, n]
            scores = per_layer.sum(0).cpu()[:, None]  # [n, 1]
        return select_keep(scores, prot[:, None], budget)[:, 0]

    # -- compaction --------------------------------------------------------------

    def maybe_compact(self, seq: Sequence) -> int:
        """Evict down to the budget if over it; returns the number of blocks freed."""
        if not seq.block_table or seq.num_kv_slots == 0:
            return 0
        keep = self.choose(seq)
        if keep is None:
            return 0
        n, k = seq.num_kv_slots, keep.shape[0]
        dst = torch.arange(k)
        moved = keep != dst
        if bool(moved.any()):
            fixed = self.fixed_slots(seq, n)
            assert not bool(fixed[dst[moved]].any()), "compaction would write a shared or prefix-hit block"
            src_s = self._slots(seq, keep[moved]).to(self._device())
            dst_s = self._slots(seq, dst[moved]).to(self._device())
            with torch.inference_mode():
                for layer in range(self.kv.num_layers):
                    for t in _parts(self.kv.k[layer]) + _parts(self.kv.v[layer]):
                        flat = t.view(-1, *t.shape[2:])  # [num_blocks * bs, Hkv, X]
                        flat[dst_s] = flat[src_s]  # NOTE: the right side is gathered first, overlap is safe
            for i in torch.unique(dst[moved] // self.bs).tolist():  # the blocks written
                self._unregister(seq.block_table[i])
        positions = self.slot_positions(seq)
        seq.kept_positions = [positions[i] for i in keep.tolist()]
        seq.num_evicted += n - k
        need = -(-k // self.bs)
        tail = seq.block_table[need:]
        del seq.block_table[need:]
        freed = len(tail)
        self.bm.free(tail)  # reference drop; their (unwritten) contents still match any hash they carry
        self.stats.compactions += 1
        self.stats.tokens_evicted += n - k
        self.stats.blocks_freed += freed
        return freed

    def _unregister(self, block: int) -> None:
        """A compacted block's contents no longer match its hash: drop it from the prefix cache."""
        bm = self.bm
        h = bm.block_hash[block]
        if h is not None:
            if bm.hash_to_block.get(h) == block:
                del bm.hash_to_block[h]
            bm.block_hash[block] = None
