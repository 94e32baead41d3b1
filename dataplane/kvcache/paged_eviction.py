"""Token eviction for the paged engine: kept-token sets compacted in place.

Block tables are per sequence and shared by all layers, so the paged engine keeps ONE set of
token slots per sequence (all layers, all kv heads); scores are the per-(layer, kv head) scores
of `eviction.py` summed over layers and kv heads (the aggregated variant of each policy):

    streaming-llm  score = position                       (sinks + most recent window)
    keydiff        score = sum over layers and kv heads of -cos(key, mean key of that head)
    h2o            score = attention received from every query so far (`paged_scores.PagedScores.acc`)
    snapkv         score = sum over layers and kv heads of the max-pooled votes of the last
                   observationWindow queries; not evicted before the prompt is fully computed

Sinks and the recent window are always kept (`eviction.protected_mask`), and so are slots in
blocks this sequence does not own exclusively: prefix-cache hits it took at admission and any
block with refcount > 1. After a step, when a sequence's PHYSICAL KV length (slots used) exceeds
its budget, `PagedEvictor.maybe_compact` keeps `budget - slack` slots (hysteresis, `EvictionSpec.
slack_tokens`, one block by default: compaction runs about once per block of new tokens), copies
them to the front of its blocks (k and v of every layer, every storage tensor, so quantized
`PagedQuantKV` codes and per-slot scales move with them, and so do H2O scores), drops the
prefix-cache registration of every block it wrote (its contents no longer match its hash) and
frees the now-unused tail blocks.

The LOGICAL position of the next token stays `num_computed_tokens` (keys carry RoPE, so kept keys
keep their positions); `Sequence.num_evicted` is the difference between the two.

Where this differs from `PolicyAttention` (per-layer, per-head sets): the sets are aggregated
over layers and heads; snapkv does not evict mid-prompt (the evaluator evicts after every forward,
the same only when the prompt is one forward); prefix-cache hit tokens were never computed by
this sequence, so their queries add no h2o score and no snapkv vote.
lookahead (LookaheadKV, prompt compression as the evaluator applies it): once the prompt is computed,
a trained module (`lookahead.LookaheadKV`, handed in as `scorer`) reads the prompt's stored K/V and
scores its rows per layer and kv head; each (layer, kv head) keeps its own best `budget` rows,
compacted per head into the same slots. That fits one block table because every (layer, kv head)
keeps the same NUMBER of rows, attention over the cache does not depend on their order, and the
protected rows (sinks, the recent window, the full-precision lane rows, decoded tokens) are the
same positions for all of them, so they land in the same slots everywhere. Decoded tokens are all
kept (no eviction after the prompt). `kept_positions` then records layer 0 / kv head 0's positions
(exact for the protected slots); a sequence compressed once has `kept_positions` set. With
token-grouped scales (KIVI per-channel keys) each (layer, kv head) keeps whole groups aligned like
the blocks (`eviction.select_chunks`), and a group's scales move with its rows, so nothing is
re-quantized and later groups still start at multiples of the group size.
NOTE: `pyramid` needs per-layer block tables; `CachePolicyConfig.check_servable` rejects it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .blocks import BlockManager
from .eviction import (
    EvictionSpec,
    keydiff_scores,
    pool_rows,
    protected_mask,
    select_chunks,
    select_keep,
    snapkv_scores,
    streaming_scores,
)
from .paged_layout import tail_start
from .paged_scores import ATTENTION_SCORED, PagedScores
from .seqview import KVSequence
from .storage import KVStorage

# keys, values per layer [P, Hkv, D] as stored -> per layer [P, Hkv] float32 (LookaheadKV's attention mass)
PromptScorer = Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class EvictionStats:
    """Counters since the engine started."""

    compactions: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0


class PagedEvictor:
    """Chooses and compacts each sequence's kept slots in a paged `KVStorage` (plain or quantized)."""

    def __init__(self, spec: EvictionSpec, kv: KVStorage, bm: BlockManager, slack_tokens: int | None = None,
                 scorer: PromptScorer | None = None) -> None:
        """slack_tokens: hysteresis (None = spec.slack_tokens, or one block when that is 0).
        An attention-scored policy (h2o, snapkv) installs its scores as the storage's `score_hook`.
        scorer: the trained LookaheadKV module's prompt scorer (policy lookahead only)."""
        if spec.policy == "lookahead" and scorer is None:
            raise ValueError("eviction lookahead needs its trained module (cache_policy.lookahead_dir)")
        if spec.policy == "lookahead" and kv.keys_pre_rope:
            raise ValueError("eviction lookahead keeps different tokens per layer and kv head: pre-RoPE keys "
                             "would need a position per head and slot")
        self.scorer = scorer
        # token-grouped scales: lookahead keeps whole groups (aligned like the blocks), which carry their scales
        self.chunk = kv.chunk if kv.grouped else 1
        self.bs = bm.block_size
        slack = slack_tokens if slack_tokens is not None else spec.slack_tokens or self.bs
        self.spec, self.kv, self.bm = replace(spec, slack_tokens=slack), kv, bm
        self.stats = EvictionStats()
        self.scores = PagedScores(self.spec, bm.num_blocks * self.bs, self.bs, kv.num_layers, self._device()) \
            if spec.policy in ATTENTION_SCORED else None
        kv.score_hook = self.scores

    def release(self, seq_id: str) -> None:
        """The sequence is finished: drop its per-sequence score state."""
        if self.scores is not None:
            self.scores.release(seq_id)

    # -- what a sequence holds ---------------------------------------------------

    @staticmethod
    def slot_positions(seq: KVSequence) -> list[int]:
        """Logical position of each physical slot (len = num_kv_slots)."""
        kept = seq.kept_positions or []
        n = seq.num_kv_slots
        return kept[:n] + list(range(len(kept) + seq.num_evicted, n + seq.num_evicted))

    def fixed_slots(self, seq: KVSequence, n: int) -> torch.Tensor:
        """[n] bool: slots in blocks this sequence does not own exclusively (never moved or dropped)."""
        rc = self.bm.ref_counts
        fixed = torch.zeros(n, dtype=torch.bool)
        for i, b in enumerate(seq.block_table[:-(-n // self.bs)]):
            if i < seq.num_hit_blocks or rc[b] > 1:
                fixed[i * self.bs:(i + 1) * self.bs] = True
        return fixed[:n]

    def _slots(self, seq: KVSequence, idx: torch.Tensor) -> torch.Tensor:
        """Physical slot indices [k] -> cache slots [k] int64."""
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[idx // self.bs] * self.bs + idx % self.bs

    def keys(self, seq: KVSequence, n: int) -> list[torch.Tensor]:
        """Per layer: the sequence's first n stored keys [n, Hkv, D] (dequantized; pre-RoPE keys rotated).

        NOTE: a quantized cache's full-precision lane rows are not overlaid here (sinks and the tail are
        protected anyway, but they enter KeyDiff's mean key as stored)."""
        blocks = torch.tensor(seq.block_table[:-(-n // self.bs)], dtype=torch.long, device=self._device())
        if self.kv.keys_pre_rope:
            pos = self.slot_positions(seq) + [0] * (len(blocks) * self.bs - n)  # padding: any valid position
            at = torch.tensor(pos, dtype=torch.long, device=self._device())
            return [self.kv.read(layer, blocks, None, at)[0][:n] for layer in range(self.kv.num_layers)]
        return [self.kv.gather(layer, blocks)[0][:n] for layer in range(self.kv.num_layers)]

    def _device(self) -> torch.device:
        return self.kv.device

    def choose(self, seq: KVSequence) -> torch.Tensor | None:
        """Ascending physical slot indices [k] to keep, or None while within budget."""
        n, seen = seq.num_kv_slots, seq.num_computed_tokens
        ev = self.spec
        if ev.policy == "snapkv" and seen < seq.num_prompt_tokens:
            return None  # SnapKV compresses a whole prompt: wait for its last (observation) queries
        pos = torch.tensor(self.slot_positions(seq), dtype=torch.long)  # [n]
        prot = protected_mask(pos[:, None], seen, ev.sink_tokens, ev.window_tokens)[:, 0] | self.fixed_slots(seq, n)
        n_prot = int(prot.sum())
        budget = ev.layer_budget(0, 1, seen, min_keep=n_prot)
        if n <= budget:
            return None
        return select_keep(self.scores_of(seq, n, pos), prot[:, None], ev.evict_to(budget, n_prot))[:, 0]

    def scores_of(self, seq: KVSequence, n: int, pos: torch.Tensor) -> torch.Tensor:
        """Scores [n, 1] (CPU) of the first n slots at logical positions pos [n]; one set for all layers/heads."""
        ev = self.spec
        if ev.policy == "streaming-llm":
            return streaming_scores(pos[:, None])
        if ev.policy == "h2o":
            assert self.scores is not None
            return self.scores.acc[self._slots(seq, torch.arange(n)).to(self._device())].cpu()[:, None]
        keys = self.keys(seq, n)  # per layer [n, Hkv, D]
        if ev.policy == "keydiff":
            per_layer = [keydiff_scores(k).sum(1) for k in keys]  # [n] each
        else:  # snapkv: each layer's window queries vote, per kv head, pooled along the sequence
            assert self.scores is not None
            q_win, q_pos = self.scores.window(seq.seq_id)  # [L, W, Hq, D], [W]
            k_pos = pos.to(q_pos.device)[:, None].expand(n, keys[0].shape[1])  # [n, Hkv]
            per_layer = [snapkv_scores(q_win[i], q_pos, k, k_pos, ev.pooling_kernel).sum(1)
                         for i, k in enumerate(keys)]
        return torch.stack(per_layer).sum(0).cpu()[:, None]

    # -- compaction --------------------------------------------------------------

    def maybe_compact(self, seq: KVSequence) -> int:
        """Evict down to the budget if over it; returns the number of blocks freed."""
        if not seq.block_table or seq.num_kv_slots == 0:
            return 0
        if self.spec.policy == "lookahead":
            return self.compress_prompt(seq)
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
                    for t in self.kv.slot_tensors(layer):
                        flat = t.view(-1, *t.shape[2:])  # [num_blocks * bs, Hkv, X]
                        flat[dst_s] = flat[src_s]  # NOTE: the right side is gathered first, overlap is safe
                if self.scores is not None:
                    self.scores.move(src_s, dst_s)
            for i in torch.unique(dst[moved] // self.bs).tolist():  # the blocks written
                self._unregister(seq.block_table[i])
        return self._drop_tail(seq, keep.tolist(), n)

    def _drop_tail(self, seq: KVSequence, keep: list[int], n: int) -> int:
        """Slots `keep` (ascending, of n) now fill the front: record their positions, free the tail blocks."""
        positions = self.slot_positions(seq)
        k = len(keep)
        seq.kept_positions = [positions[i] for i in keep]
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

    # -- lookahead: per (layer, kv head) prompt compression ---------------------------

    def compress_prompt(self, seq: KVSequence) -> int:
        """Once the prompt is computed: keep each (layer, kv head)'s best rows of it; blocks freed."""
        if seq.kept_positions is not None or seq.num_computed_tokens < seq.num_prompt_tokens:
            return 0
        assert self.scorer is not None and seq.num_evicted == 0
        ev, n, p, kv = self.spec, seq.num_kv_slots, seq.num_prompt_tokens, self.kv
        pos = torch.arange(n)
        # full-precision rows of a quantized cache (sinks, residual window, an incomplete group) as the evaluator
        tail = tail_start(p, kv.sink_tokens, kv.residual_tokens, self.chunk)
        prot = (protected_mask(pos, p, ev.sink_tokens, ev.window_tokens) | (pos >= tail) | (pos >= p)  # decoded
                | self.fixed_slots(seq, n))
        budget = max(int(prot[:p].sum()), ev.layer_budget(0, 1, p, 0)) + (n - p)
        seq.kept_positions = list(range(n))  # compressed (even when nothing goes): never again
        if budget >= n:
            return 0
        blocks = torch.tensor(seq.block_table[:-(-p // self.bs)], dtype=torch.long, device=self._device())
        with torch.inference_mode():
            stored = [kv.codec_rows(layer, seq, blocks, p) for layer in range(kv.num_layers)]
            mass = self.scorer([k for k, _ in stored], [v for _, v in stored])  # per layer [P, Hkv]
            keep = []
            for m in mass:
                pooled = pool_rows(m.float().cpu(), ev.pooling_kernel)  # [P, Hkv]
                scores = torch.cat([pooled, pooled.new_zeros(n - p, pooled.shape[1])])  # decoded rows: protected
                mask = prot[:, None].expand_as(scores)
                keep.append(select_chunks(scores, mask, budget, self.chunk) if self.chunk > 1 else
                            select_keep(scores, mask, budget))  # [k, Hkv] ascending
            if keep[0].shape[0] == n:  # whole groups rounded the budget up to every row
                return 0
            self._move_per_head(seq, keep, n)
        return self._drop_tail(seq, keep[0][:, 0].tolist(), n)

    def _move_per_head(self, seq: KVSequence, keep: list[torch.Tensor], n: int) -> None:
        """keep: per layer [k, Hkv] slot indices -> moved to slots 0..k-1 of each (layer, kv head)."""
        k, hkv = keep[0].shape
        dst = torch.arange(k)
        moved = torch.stack([idx != dst[:, None] for idx in keep]).any(0).any(1)  # [k]
        if not bool(moved.any()):
            return
        fixed = self.fixed_slots(seq, n)
        assert not bool(fixed[dst[moved]].any()), "compaction would write a shared or prefix-hit block"
        dev = self._device()
        dst_s = self._slots(seq, dst).to(dev)[:, None]  # [k, 1]
        heads = torch.arange(hkv, device=dev)[None, :]  # [1, Hkv]
        table = torch.tensor(seq.block_table, dtype=torch.long, device=dev)
        for layer, idx in enumerate(keep):
            src_s = self._slots(seq, idx.reshape(-1)).view(k, hkv).to(dev)  # [k, Hkv]
            for t in self.kv.slot_tensors(layer):
                flat = t.view(-1, *t.shape[2:])  # [num_blocks * bs, Hkv, X]
                flat[dst_s, heads] = flat[src_s, heads]  # the right side is gathered first
            if self.chunk > 1:  # whole token groups: their scales move with them (per head); an incomplete
                # last group has no scales yet (and, longer than a block, not all its blocks)
                self._move_group_stats(layer, table, idx[:(k // self.chunk) * self.chunk:self.chunk].to(dev), heads)
        for i in torch.unique(dst[moved] // self.bs).tolist():  # the blocks written
            self._unregister(seq.block_table[i])

    def _move_group_stats(self, layer: int, table: torch.Tensor, first: torch.Tensor, heads: torch.Tensor) -> None:
        """first [G, Hkv]: first slot of each kept group per kv head -> its scales into groups 0..G-1."""
        kv: Any = self.kv  # a PagedQuantKV (token-grouped codecs)
        to = torch.arange(first.shape[0], device=first.device) * self.chunk
        for c, t in kv.group_stats(layer):
            src = kv.group_stat_rows(c, table, first.reshape(-1)).view(*first.shape, -1)  # [G, Hkv, copies]
            dst = kv.group_stat_rows(c, table, to)  # [G, copies]
            for j in range(dst.shape[1]):
                t[dst[:, j, None], heads] = t[src[:, :, j], heads]  # [Hs, Ds] rows per head (Hs = Hkv)
