"""Hidden states stored beside the KV at a few layers: DroidSpeak's E-cache.

A variant that reuses a sibling's prefix KV recomputes a few contiguous layer groups; group
[i..j] starts from the sibling's hidden state entering layer i, so the engine keeps that hidden
state for every slot at exactly those *transition* layers (`kvsharing.transition_layers`), indexed
like the KV: slot `s` of block `s // block_size`. Rows are valid only where this engine's own
forward wrote them since the block was last filled from elsewhere (the memory pool, a prefill
pod's hand-off): `transfer.write_block` invalidates a block, so a block without its hidden state
is never reused across variants.

    store = HiddenStore(layers=(9, 21), num_blocks=512, block_size=16, hidden_size=576, dtype, device)
    store.write(9, slots, hidden)            # slots [T] int64, hidden [T, H]
    store.read(9, slots) -> [T, H]
    store.usable(block_ids) -> leading blocks whose rows are all valid
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HiddenStore:
    """[len(layers), num_blocks * block_size, H] hidden rows plus a per-slot validity mask."""

    def __init__(self, layers: Sequence[int], num_blocks: int, block_size: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.layers = tuple(sorted(set(layers)))
        self.block_size = block_size
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        slots = num_blocks * block_size
        self.rows = torch.zeros((len(self.layers), slots, hidden_size), dtype=dtype, device=device)
        self.valid = torch.zeros(slots, dtype=torch.bool, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, hidden_size: int, dtype: torch.dtype) -> int:
        """What it adds to one KV block (count it in the KV budget)."""
        return num_layers * block_size * hidden_size * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def write(self, layer: int, slots: torch.Tensor, hidden: torch.Tensor) -> None:
        """hidden [T, H] entering `layer` for the tokens at `slots` [T]."""
        self.rows[self._index[layer]].index_copy_(0, slots, hidden.to(self.rows.dtype))
        if layer == self.layers[-1]:  # every transition layer of these slots is written now
            self.valid[slots] = True

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """-> [T, H] rows entering `layer` at `slots` [T]."""
        return self.rows[self._index[layer]].index_select(0, slots)

    def usable(self, blocks: Sequence[int]) -> int:
        """How many leading `blocks` hold valid rows in every slot (all of them when no layer is stored)."""
        if not self.layers:
            return len(blocks)
        bs = self.block_size
        for n, b in enumerate(blocks):
            if not bool(self.valid[b * bs:(b + 1) * bs].all()):
                return n
        return len(blocks)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.rows[:, dst * bs:(dst + 1) * bs] = self.rows[:, src * bs:(src + 1) * bs]
        self.valid[dst * bs:(dst + 1) * bs] = self.valid[src * bs:(src + 1) * bs]

    def invalidate(self, block: int) -> None:
        """The block's KV came from elsewhere: its rows are not this KV's hidden states."""
        self.valid[block * self.block_size:(block + 1) * self.block_size] = False
