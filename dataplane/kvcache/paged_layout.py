"""Per-step row bookkeeping for a quantized paged cache: which rows go where (numpy, per sequence).

For every scheduled sequence the storage knows its lane, its new tokens (logical positions
[start, end)), its block table, how many tokens it evicted and how many it took from the prefix
cache. `policy_step` turns that into a `PolicyStep`:

- lane rows: a new token at position p goes to its lane's sink row (p < sink_tokens) or, when it is
  among the step's last `ring` tokens, to ring row p % ring (earlier ones would be overwritten in the
  same step, so they go to scratch);
- completed groups (token-grouped codecs): every group of g slots whose last slot is written this
  step, its rows taken from this step's tokens or the lane (ring rows of earlier steps);
- overlays (reads): the rows `PolicyAttention` holds in full precision before this step (sinks,
  and the tail of `residual` + an incomplete group); this step's own rows are overlaid by the
  backend from the K/V it has in hand. Rows taken from the prefix cache have no lane copy and are
  read as stored. The backend writes the step's lane rows after its reads, so a ring of
  `residual + group - 1` rows is enough.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np
import torch

from .seqview import ScheduledKV
from .storage import PolicyStep

if TYPE_CHECKING:
    from .paged_quant import PagedQuantKV


def tail_start(seen: int, sinks: int, residual: int, chunk: int) -> int:
    """First position of the full-precision tail after `seen` tokens (`LayerKV.append`'s rule): token
    groups are aligned to absolute positions (multiples of `chunk`, as paged blocks are), and a group
    is encoded once `residual` tokens follow it; sink rows are never part of the body."""
    return max(min(sinks, seen), (max(seen - residual, 0) // chunk) * chunk)


class _Lane:
    """Row arithmetic of one sequence's lane."""

    def __init__(self, cache: PagedQuantKV, lane: int) -> None:
        lanes = cache.lanes
        self.sink, self.ring = cache.sink_tokens, cache.ring_tokens
        self.base = lane * lanes.width if lanes is not None else 0
        self.scratch = lanes.scratch if lanes is not None else 0

    def rows(self, p: np.ndarray) -> np.ndarray:
        """Lane row of each position (assumes the row is live: a sink or within the ring)."""
        ring = self.base + self.sink + (p % self.ring if self.ring else 0)
        return np.where(p < self.sink, self.base + p, ring)


def policy_step(cache: PagedQuantKV, items: Seq[ScheduledKV], lanes: Seq[int], first_rows: np.ndarray,
                tables: np.ndarray, positions: torch.Tensor, num_decodes: int, decode_len: int,
                gathered: Seq[bool], device: torch.device) -> PolicyStep:
    """items: the step's sequences in flat order (decodes first); first_rows [B]: flat row of each one's first
    new token; tables [B, M] block tables; decode_len: slots each decode gathers; gathered: per prefill
    chunk, whether it reads cached context."""
    bs, s_tok, ring, chunk = cache.block_size, cache.sink_tokens, cache.ring_tokens, cache.chunk
    resid = cache.residual_tokens
    n_lane_rows = cache.lanes.scratch + 1 if cache.lanes is not None else 0
    lane_rows: list[np.ndarray] = []
    g_src: list[np.ndarray] = []
    g_valid: list[np.ndarray] = []
    g_slots: list[np.ndarray] = []
    g_stat: list[np.ndarray] = []
    dec_dst: list[np.ndarray] = []
    dec_src: list[np.ndarray] = []
    pf_overlays: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    group = cache.kc.group_size if cache.kc.token_grouped else cache.vc.group_size
    pre_rope = cache.keys_pre_rope
    dec_pos: list[np.ndarray] = []
    pf_pos: list[torch.Tensor | None] = []
    restore: list[np.ndarray] = [[], []]  # type: ignore[list-item]
    save: list[np.ndarray] = [[], []]  # type: ignore[list-item]
    last_sink = (s_tok - 1) // bs
    for i, it in enumerate(items):
        seq = it.seq
        start, n = it.start, it.num_new_tokens
        end, ev = start + n, seq.num_evicted
        lane = _Lane(cache, lanes[i])
        if s_tok and cache.lanes is not None:
            hit = seq.num_hit_blocks * bs
            if hit >= s_tok and start == hit:  # its sinks come from the prefix cache: copy them from the stash
                entry = cache.stash_entry(int(tables[i][last_sink]), create=False)
                assert entry is not None, "usable_hit admitted a hit whose sinks are not stashed"
                restore[0].append(lane.base + np.arange(s_tok))
                restore[1].append(cache.lanes.stash_base + entry * s_tok + np.arange(s_tok))
            elif start < s_tok <= end:  # it computes its sinks: save them for later hits
                entry = cache.stash_entry(int(tables[i][last_sink]), create=True)
                save[0].append(cache.lanes.stash_base + entry * s_tok + np.arange(s_tok))
                save[1].append(lane.base + np.arange(s_tok))
        new = np.arange(start, end)
        rows = np.full(n, lane.scratch, dtype=np.int64)
        live = (new < s_tok) | ((new >= end - ring) if ring else np.zeros(n, dtype=bool))
        rows[live] = lane.rows(new[live])
        lane_rows.append(rows)
        table = tables[i]
        if cache.grouped:
            # eviction of token-grouped scales drops whole groups (lookahead), so ev is a multiple of the group
            # and logical group boundaries stay physical ones: slots and stat rows at r - ev
            assert ev % group == 0, "token-grouped scales are evicted in whole groups only"
            for e in range((start // group + 1) * group, end + 1, group):
                r = np.arange(e - group, e)
                g_src.append(np.where(r >= start, n_lane_rows + first_rows[i] + (r - start), lane.rows(r)))
                g_valid.append(r >= s_tok)
                rp, ep = r - ev, e - ev
                g_slots.append(table[rp // bs] * bs + rp % bs)
                if group <= bs:
                    g_stat.append(np.array([table[(ep - 1) // bs] * (bs // group) + ((ep - 1) % bs) // group]))
                else:
                    g_stat.append(table[(ep - group) // bs:(ep - group) // bs + group // bs])
        reads = i < num_decodes or gathered[i - num_decodes]
        if not reads:
            pf_overlays.append(None)
            pf_pos.append(None)
            continue
        n_phys = end - ev
        # rows PolicyAttention holds in full precision before this step (its tokens attend the
        # past as stored, then their own K/V), minus prefix-cache rows (no lane copy)
        sinks = np.arange(min(s_tok, start))
        tail = np.arange(tail_start(start, s_tok, resid, chunk), start)
        pos = np.concatenate([sinks, tail])
        # (sinks always: a hit that covers them copied them into the lane, see `usable_hit`)
        keep = (pos >= seq.num_hit_blocks * bs) | (pos < s_tok)
        pos = pos[keep]
        dst = np.where(pos < s_tok, pos, pos - ev)
        if pre_rope:
            gathered_len = decode_len if i < num_decodes else -(-n_phys // bs) * bs  # whole blocks
            slot_pos = np.arange(gathered_len, dtype=np.int64) + ev
            kept = seq.kept_positions or []
            slot_pos[:len(kept)] = kept
            slot_pos[n_phys:] = 0  # padding: masked, any valid position
        if i < num_decodes:
            dec_dst.append(i * decode_len + dst)
            dec_src.append(lane.rows(pos))
            if pre_rope:
                dec_pos.append(slot_pos)
        else:
            pf_overlays.append((_dev(dst, device), _dev(lane.rows(pos), device)))
            pf_pos.append(_dev(slot_pos, device) if pre_rope else None)
    step = PolicyStep(positions=positions, lane_rows=_dev(np.concatenate(lane_rows), device),
                      prefill_overlays=pf_overlays, prefill_positions=pf_pos)
    if restore[0]:
        step.sink_restore = (_dev(np.concatenate(restore[0]), device), _dev(np.concatenate(restore[1]), device))
    if save[0]:
        step.sink_save = (_dev(np.concatenate(save[0]), device), _dev(np.concatenate(save[1]), device))
    if g_src:
        step.group_src = _dev(np.stack(g_src), device)
        step.group_valid = torch.from_numpy(np.stack(g_valid)).to(device)
        step.group_slots = _dev(np.stack(g_slots), device)
        step.group_stat_rows = _dev(np.stack(g_stat), device)
    if num_decodes:
        step.decode_overlay = (_dev(_cat(dec_dst), device), _dev(_cat(dec_src), device))
        ctx = np.array([it.start + 1 - it.seq.num_evicted for it in items[:num_decodes]], dtype=np.int64)
        step.decode_own = _dev(np.arange(num_decodes) * decode_len + ctx - 1, device)
        if pre_rope:
            step.decode_positions = _dev(np.stack(dec_pos), device)
    return step


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _dev(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)
