"""What kvcache reads of the engine's sequences: structural types, so kvcache imports nothing from engine.

The engine's `Sequence` and `ScheduledSeq` satisfy these protocols as they are; tests may pass any
object with the same attributes.
"""

from __future__ import annotations

from typing import Protocol


class KVSequence(Protocol):
    """A sequence as the KV cache sees it: its block table and where its tokens' KV lives.

    LOGICAL position (RoPE) of token i is i; its PHYSICAL slot index is i - num_evicted for tokens
    computed after the last compaction (`paged_eviction`).
    """

    block_table: list[int]  # block ids, shared by all layers
    num_computed_tokens: int  # tokens with KV (logical)
    num_prompt_tokens: int
    num_evicted: int  # tokens dropped from the KV so far
    kept_positions: list[int] | None  # logical positions of the slots kept by the last compaction
    num_hit_blocks: int  # leading blocks taken from the prefix cache at admission

    @property
    def seq_id(self) -> str: ...

    @property
    def num_kv_slots(self) -> int:
        """PHYSICAL KV length: slots holding computed tokens."""
        ...


class ScheduledKV(Protocol):
    """One sequence's share of a step: `num_new_tokens` new tokens from logical position `start`."""

    @property
    def seq(self) -> KVSequence: ...

    @property
    def num_new_tokens(self) -> int: ...

    @property
    def start(self) -> int: ...
