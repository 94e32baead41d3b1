"""The storage side of the paged KV cache that every implementation shares.

`PolicyStep` is the per-step plan of a storage whose reads overlay full-precision rows (the
quantized `paged_quant.PagedQuantKV`); `paged.PagedAttention` hands it to the storage each layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    decode_positions: torch.Tensor | None = None  # [Bd, L] logical position of each gathered slot (pre-RoPE)
    prefill_overlays: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    prefill_positions: list[torch.Tensor | None] = field(default_factory=list)  # [ctx] per chunk (pre-RoPE)
