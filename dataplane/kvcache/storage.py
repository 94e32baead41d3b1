"""One storage interface for the paged KV cache: `KVStorage`, its per-step plan and per-sequence state.

A storage holds the K and V of every layer in blocks of `block_size` slots; slot `s` is
`(s // block_size, s % block_size)` and block ids come from `blocks.BlockManager`. Two
implementations: `paged.PagedKVCache` (the model dtype, exact) and `paged_quant.PagedQuantKV`
(codes + scales, full-precision lanes). `build.kv_storage_spec` picks one from a CachePolicy.

What the engine and the rest of kvcache may rely on (and nothing else):

- writes and reads: `store` / `gather` (every storage), and, within a step whose plan is not None,
  `store_step` / `read` / `write_lanes` (what `paged.PagedAttention` calls per layer);
- the per-step plan: `plan_step(...)` returns None when reads return exactly what was stored, else a
  `PolicyStep` (which rows to overlay and write) that the runner sets as `PagedMetadata.policy`;
- per-sequence state owned by the storage: its lane (`lane`, `release`);
- bytes as stored: `parts`, `slot_tensors` (what compaction moves), `block_views` / `lane_views`
  (what `transfer` sends), `layout_facts`, `nbytes`;
- `score_hook`: set by an attention-scored eviction policy (`paged_eviction.PagedEvictor`); the runner
  asks it for the step's `StepScores` before the forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .seqview import KVSequence, ScheduledKV


@dataclass
class PolicyStep:
    """Per-step row bookkeeping of a quantized paged cache (all int64 unless noted, on the cache device)."""

    positions: torch.Tensor  # [T] logical position of each new token
    lane_rows: torch.Tensor  # [T] lane row each new token's full-precision K/V goes to (scratch = none)
    group_src: torch.Tensor | None = None  # [G, g] rows of cat(lane rows, new tokens) forming each completed group
    group_valid: torch.Tensor | None = None  # [G, g] bool: not a sink (sinks do not widen a group's scale)
    group_slots: torch.Tensor | None = None  # [G, g] cache slot of each row
    group_stat_rows: torch.Tensor | None = None  # [G, c] stats rows to write (c copies when g > block_size)
    decode_overlay: tuple[torch.Tensor, torch.Tensor] | None = None  # (dst rows of [Bd * L], lane rows)
    decode_own: torch.Tensor | None = None  # [Bd] row of [Bd * L] holding each decode's own new token
    # [Bd, L] lane row of each decode slot (-1: read the codes); built once per step by the first layer
    # that needs it (`PagedQuantKV.fused_decode`), the same for every layer
    decode_lane_map: torch.Tensor | None = None
    # rotated keys: the lane rows the decodes read (the map above indexes these), so only they are rotated
    decode_lane_rows: torch.Tensor | None = None
    decode_positions: torch.Tensor | None = None  # [Bd, L] logical position of each gathered slot (pre-RoPE)
    prefill_overlays: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    prefill_positions: list[torch.Tensor | None] = field(default_factory=list)  # [ctx] per chunk (pre-RoPE)
    sink_restore: tuple[torch.Tensor, torch.Tensor] | None = None  # (lane rows, stash rows): hits' sinks
    sink_save: tuple[torch.Tensor, torch.Tensor] | None = None  # (stash rows, lane rows): sinks just computed


class LaneTable:
    """Which lane each running sequence holds; lanes of sequences no longer running are reused."""

    def __init__(self, num_lanes: int) -> None:
        self.free = list(range(num_lanes - 1, -1, -1))
        self.held: dict[str, tuple[int, Any]] = {}  # seq_id -> (lane, Sequence)

    def lane(self, seq: Any) -> int:
        got = self.held.get(seq.seq_id)
        if got is not None:
            return got[0]
        if not self.free:  # a preempted sequence recomputes everything, so its lane can go
            for sid, (lane, other) in list(self.held.items()):
                if other.status.value != "running":
                    del self.held[sid]
                    self.free.append(lane)
        lane = self.free.pop()
        self.held[seq.seq_id] = (lane, seq)
        return lane

    def release(self, seq_id: str) -> None:
        got = self.held.pop(seq_id, None)
        if got is not None:
            self.free.append(got[0])


class ScoreHook(Protocol):
    """Attention-based eviction scores (`paged_scores.PagedScores`): one plan per step."""

    def plan(self, items: Seq[ScheduledKV], meta: Any) -> Any:
        """Before a forward: the step's `StepScores` for `PagedMetadata.scores`."""
        ...


class KVStorage(ABC):
    """The KV tensors of all layers, indexed by block id (see the module docstring for the contract)."""

    keys_pre_rope: bool = False  # keys are stored before RoPE and rotated on read
    sink_tokens: int = 0  # first tokens held at full precision (`PagedQuantKV`)
    residual_tokens: int = 0  # most recent tokens held at full precision (`PagedQuantKV`)
    chunk: int = 1  # tokens encoded together (a token group of shared scales)
    grouped: bool = False  # scales shared by a group of tokens (`PagedQuantKV` with a token-grouped codec)
    lanes: Any = None  # `paged_quant.FullPrecisionLanes` when the storage keeps full-precision rows
    score_hook: ScoreHook | None = None
    hidden: Any = None  # `hidden.HiddenStore` (DroidSpeak's E-cache) when a variant reuses a sibling's KV

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_lanes: int = 0) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.lane_table = LaneTable(num_lanes)  # which lane each running sequence holds

    # -- writes and reads ---------------------------------------------------------

    @abstractmethod
    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [T] int64, k/v [T, Hkv, D] -> written into the layer's blocks."""

    @abstractmethod
    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids [..., M] int64 -> k, v [..., M * block_size, Hkv, D] at the model dtype (a copy)."""

    def store_step(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   step: PolicyStep) -> torch.Tensor:
        """`store` under a step plan; returns the keys as stored, for `write_lanes`."""
        self.store(layer, slots, k, v)
        return k

    def write_lanes(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: PolicyStep) -> None:
        """The step's full-precision rows into their lanes (after the step's reads); none by default."""
        return None

    def read(self, layer: int, block_ids: torch.Tensor, overlay: tuple[torch.Tensor, torch.Tensor] | None,
             positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`gather` plus the plan's overlays (lane rows; RoPE for pre-RoPE keys). positions: logical
        position of every gathered slot (the result's leading dims), used for pre-RoPE keys."""
        return self.gather(layer, block_ids)

    def codec_rows(self, layer: int, seq: KVSequence, block_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's first n rows [n, Hkv, D] each as the codec stores it (what LookaheadKV's module reads,
        as `eval_tf.TeacherForced.stored_prompt` does); block_ids: its first blocks [M]."""
        k, v = self.gather(layer, block_ids)
        return k[:n], v[:n]

    def fused_decode(self, kernels: Any, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     tables: torch.Tensor, context_lens: torch.Tensor, step: PolicyStep) -> torch.Tensor | None:
        """Decode attention by a compiled kernel that reads this storage as it is (q [Bd, Hq, D], the
        decodes' own k/v [Bd, Hkv, D]) -> [Bd, Hq, D]; None: no kernel for it, the caller reads and attends."""
        return None

    # -- the per-step plan and per-sequence state -------------------------------------

    @property
    def exact(self) -> bool:
        """Reads return exactly what was stored, with no per-step plan: blocks can be shared by the
        choices of an n > 1 request (`copy_block`) and prefill chunks attended in one padded batch."""
        return True

    def plan_step(self, items: Seq[ScheduledKV], first_rows: np.ndarray, tables: np.ndarray,
                  positions: torch.Tensor, num_decodes: int, decode_len: int, gathered: Seq[bool],
                  device: torch.device) -> PolicyStep | None:
        """Which rows this step writes and overlays (None for an exact storage).

        items: the step's sequences in flat order (decodes first); first_rows [B]: flat-batch row of
        each one's first new token; tables [B, M] block tables; positions [T] logical positions;
        decode_len: slots each decode gathers; gathered: per prefill chunk, whether it reads cached context.
        """
        return None

    def usable_hit(self, hits: list[int]) -> int:
        """How many of a new sequence's prefix-cache hits (block ids, in order) it may take."""
        return len(hits)

    def lane(self, seq: KVSequence) -> int:
        """The lane `seq` holds (taken on first use)."""
        return self.lane_table.lane(seq)

    def release(self, seq_id: str) -> None:
        """The sequence is finished: its per-sequence state (lane) is free again."""
        self.lane_table.release(seq_id)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block, all layers (copy-on-write of a prompt's last block for a forked choice)."""
        assert self.exact, "forks of a storage with per-sequence rows recompute instead"
        with torch.inference_mode():
            for d, s in zip(self.block_views(dst), self.block_views(src), strict=True):
                d.copy_(s)
            if self.hidden is not None:
                self.hidden.copy_block(src, dst)

    # -- bytes as stored -------------------------------------------------------------

    @abstractmethod
    def parts(self, layer: int) -> list[torch.Tensor]:
        """Every tensor of one layer, the keys' then the values', in a fixed order."""

    @property
    def device(self) -> torch.device:
        return self.parts(0)[0].device

    def slot_tensors(self, layer: int) -> list[torch.Tensor]:
        """Tensors indexed [num_blocks, block_size, ...] (what compaction moves with a slot)."""
        return [t for t in self.parts(layer) if t.shape[:2] == (self.num_blocks, self.block_size)]

    def block_views(self, block: int) -> list[torch.Tensor]:
        """Every tensor slice that holds `block`'s KV, in a fixed order (views, no copies)."""
        views: list[torch.Tensor] = []
        nb = self.num_blocks
        for layer in range(self.num_layers):
            for t in self.parts(layer):
                if t.shape[0] == nb:  # [num_blocks, block_size, ...]
                    views.append(t[block])
                else:  # token-grouped stats: rows_per_block rows per block
                    rows = t.shape[0] // nb
                    views.append(t[block * rows:(block + 1) * rows])
        return views

    def lane_views(self, lane: int) -> list[torch.Tensor]:
        """The full-precision rows of one lane (sinks + ring) of every layer; [] without lanes."""
        lanes = self.lanes
        if lanes is None:
            return []
        lo, hi = lane * lanes.width, (lane + 1) * lanes.width
        return [t[lo:hi] for layer in range(self.num_layers) for t in (lanes.k[layer], lanes.v[layer])]

    def layout_facts(self) -> dict[str, Any]:
        """Settings beyond the tensor shapes that sender and receiver of KV must share."""
        return {}

    def nbytes(self) -> int:
        """Bytes allocated: blocks plus lanes."""
        blocks = sum(t.numel() * t.element_size() for layer in range(self.num_layers) for t in self.parts(layer))
        return blocks + (self.lanes.nbytes() if self.lanes is not None else 0)
