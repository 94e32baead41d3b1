"""Quantized paged KV: codes in blocks, scales per slot or per token group, full-precision lanes.

What a read returns equals what `PolicyAttention` reads for one sequence:

    sinks (full precision) | body (codec) | tail (full precision) | this step's own K/V

Storage per layer, for keys and for values with codec `c`:

    codes       [num_blocks, block_size, Hkv, Dc]       uint8 (fp8 bytes viewed as uint8)
    per-token codecs (`c.token_grouped` False): one scale (and zero) per slot and channel group
        scale/zero  [num_blocks, block_size, Hkv, D / g]
    token-grouped codecs (per-channel / per-head / per-tensor over g tokens, KIVI keys):
        scale/zero  [num_blocks * max(1, block_size / g), Hs, Ds]; the stats row of slot
        (block b, offset o) is b * (block_size / g) + o // g when g <= block_size, else b (each of
        the g / block_size blocks of a group holds a copy).

A token group is encoded once its last slot is written, from full-precision rows: this step's
K/V and the sequence's lane. `FullPrecisionLanes` keeps, per running sequence, its first
`sink_tokens` tokens and a ring of its last `ring_tokens` tokens at the model dtype; reads overlay
them on the dequantized rows. Keys are stored before RoPE when `keys_pre_rope` (KVQuant) and rotated
at their logical positions on read. Which rows to write and overlay each step is computed by
`paged_layout.policy_step` (per sequence, in numpy) and handed over as a `PolicyStep`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch

from .paged_layout import _Lane, policy_step
from .quant import STAT_DTYPE, Codec, hadamard_rotation
from .seqview import ScheduledKV
from .storage import KVStorage, LaneTable, PolicyStep

# rope(positions [N]) -> cos, sin [N, 1, D] at the model dtype (model.rotary.cos_sin)
RopeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate-half RoPE (inverse = un-rotate). k [N, H, D], cos/sin [N, 1, D]."""
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return k * cos + rotated * (-sin if inverse else sin)


class FullPrecisionLanes:
    """Per running sequence ("lane"): `sink_tokens` rows, then a ring of `ring_tokens` rows, per layer.

    Row of logical position p in lane l: l * width + p for a sink, l * width + sink + p % ring for
    the rest. Then `num_lanes` stash entries of `sink_tokens` rows each: the sinks of prompts whose
    blocks are in the prefix cache (a hit copies them into its lane, see `PagedQuantKV.usable_hit`);
    the last row is scratch for tokens that need no copy. k/v [rows, Hkv, D].
    """

    def __init__(self, num_layers: int, num_lanes: int, sink_tokens: int, ring_tokens: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_lanes, self.sink, self.ring = num_lanes, sink_tokens, ring_tokens
        self.width = sink_tokens + ring_tokens
        self.stash_base = num_lanes * self.width
        self.scratch = self.stash_base + num_lanes * sink_tokens
        shape = (self.scratch + 1, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_needed(num_layers: int, num_lanes: int, sink_tokens: int, ring_tokens: int, num_kv_heads: int,
                     head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        rows = num_lanes * (2 * sink_tokens + ring_tokens) + 1
        return 2 * num_layers * rows * num_kv_heads * head_dim * elem

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagedQuantKV(KVStorage):
    """Quantized paged KV storage (`storage.KVStorage`): codes and scales in blocks, full-precision lanes.

    `store(layer, slots, k, v)` / `gather(layer, block_ids)` work as for `PagedKVCache` (per-token
    codecs only; no lanes). The paged backend uses `store_step` / `read` / `write_lanes` with the
    `PolicyStep` that `plan_step` computes; each running sequence holds one lane (`lane`, `release`).
    """

    def __init__(self, kc: Codec, vc: Codec, num_layers: int, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", sink_tokens: int = 0, residual_tokens: int = 0,
                 num_lanes: int = 0, keys_pre_rope: bool = False, rope: RopeFn | None = None) -> None:
        if keys_pre_rope and rope is None:
            raise ValueError("keys_pre_rope needs the model's rope table")
        super().__init__(num_layers, num_blocks, block_size)
        self.kc, self.vc = kc, vc
        self.keys_pre_rope, self.rope = keys_pre_rope, rope
        for c in (kc, vc):
            g = c.group_size
            if c.token_grouped and block_size % g and g % block_size:
                raise ValueError(f"token-grouped scales: groupSize {g} and block size {block_size} must divide "
                                 "one another")
        self.sink_tokens, self.residual_tokens = sink_tokens, residual_tokens
        self.lanes = None
        if self.ring_tokens or sink_tokens:
            self.lanes = FullPrecisionLanes(num_layers, num_lanes, sink_tokens, self.ring_tokens, kc.num_heads,
                                            kc.head_dim, kc.fp_dtype, device)
            self.lane_table = LaneTable(num_lanes)
        # prefix-cache hits and full-precision sinks: block id of a prompt's last sink block -> stash
        # entry (LRU over num_lanes entries)
        self.stash: OrderedDict[int, int] = OrderedDict()
        self.k = [self._alloc(kc, device) for _ in range(num_layers)]
        self.v = [self._alloc(vc, device) for _ in range(num_layers)]

    # -- shape facts -----------------------------------------------------------

    @property
    def chunk(self) -> int:
        """Tokens that must exist before they are encoded: a group if either codec is token-grouped."""
        return max(self.kc.chunk_tokens, self.vc.chunk_tokens)

    @property
    def ring_tokens(self) -> int:
        """Lane ring length: the residual window plus an incomplete group."""
        return self.residual_tokens + self.chunk - 1

    @property
    def grouped(self) -> bool:
        return self.kc.token_grouped or self.vc.token_grouped

    def stat_rows_per_block(self, c: Codec) -> int:
        return max(1, self.block_size // c.group_size) if c.token_grouped else 0

    def group_stats(self, layer: int) -> list[tuple[Codec, torch.Tensor]]:
        """The token-grouped codecs' stat tensors of a layer (scale, zero: [rows, Hs, Ds]) with their codec."""
        return [(c, t) for c, parts in ((self.kc, self.k[layer]), (self.vc, self.v[layer]))
                if c.token_grouped for t in parts[1:]]

    def group_stat_rows(self, c: Codec, table: torch.Tensor, first_slots: torch.Tensor) -> torch.Tensor:
        """Stat rows [G, copies] of the groups whose first slot (physical, a multiple of the group size) is
        first_slots [G] in a sequence's block table [M] (a group longer than a block has a copy per block)."""
        g, bs = c.group_size, self.block_size
        if g <= bs:
            return (table[first_slots // bs] * (bs // g) + (first_slots % bs) // g)[:, None]
        return table[(first_slots // bs)[:, None] + torch.arange(g // bs, device=table.device)]

    def _alloc(self, c: Codec, device: torch.device | str) -> list[torch.Tensor]:
        nb, bs, h, d = self.num_blocks, self.block_size, c.num_heads, c.head_dim
        if not c.is_quantized:
            return [torch.zeros(nb, bs, h, d, dtype=c.storage_dtype, device=device)]
        dc = c.code_dim
        codes = torch.zeros(nb, bs, h, dc, dtype=torch.uint8, device=device)
        if c.token_grouped:
            _, hs, ds = c._stat_shape(1)
            stat = torch.zeros(nb * self.stat_rows_per_block(c), hs, ds, dtype=STAT_DTYPE, device=device)
        else:
            stat = torch.zeros(nb, bs, h, d // c.group_size, dtype=STAT_DTYPE, device=device)
        return [codes, stat] + ([torch.zeros_like(stat)] if c.dtype != "fp8" else [])

    @staticmethod
    def bytes_per_block(kc: Codec, vc: Codec, num_layers: int, block_size: int) -> int:
        """K + V bytes of one block across all layers, as allocated (lanes not included)."""
        total = 0
        for c in (kc, vc):
            if not c.is_quantized:
                total += int(c.bytes_per_token() * block_size)
                continue
            elem_codes = c.code_dim
            n_stats = 1 if c.dtype == "fp8" else 2
            stat_elem = torch.empty((), dtype=STAT_DTYPE).element_size()
            if c.token_grouped:
                _, hs, ds = c._stat_shape(1)
                rows = max(1, block_size // c.group_size)
                stats = rows * hs * ds
            else:
                stats = block_size * c.num_heads * (c.head_dim // c.group_size)
            total += block_size * c.num_heads * elem_codes + n_stats * stat_elem * stats
        return num_layers * total

    def parts(self, layer: int) -> list[torch.Tensor]:
        """The keys' codes, scales (and zeros), then the values' (see the module docstring for shapes)."""
        return self.k[layer] + self.v[layer]

    def layout_facts(self) -> dict[str, Any]:
        return {"sink_tokens": self.sink_tokens, "residual_tokens": self.residual_tokens,
                "keys_pre_rope": self.keys_pre_rope, "rotated_keys": self.kc.rotated}

    # -- the step plan ---------------------------------------------------------------

    @property
    def exact(self) -> bool:
        return False

    def plan_step(self, items: Seq[ScheduledKV], first_rows: np.ndarray, tables: np.ndarray,
                  positions: torch.Tensor, num_decodes: int, decode_len: int, gathered: Seq[bool],
                  device: torch.device) -> PolicyStep:
        """Lanes for the step's sequences, then `paged_layout.policy_step`."""
        lanes = [self.lane(it.seq) for it in items] if self.lanes is not None else [0] * len(items)
        return policy_step(self, items, lanes, first_rows, tables, positions, num_decodes, decode_len,
                           gathered, device)

    # -- prefix-cache hits over full-precision sinks ------------------------------------

    def usable_hit(self, hits: list[int]) -> int:
        """How many of the prefix-cache `hits` (block ids) a new sequence may take.

        Sinks are read from the lane at full precision; a hit carries no lane, so a hit that covers
        the sinks is taken only when their rows are in the stash (saved when its prompt computed
        them); a hit that ends inside the sinks is not taken."""
        if not hits or self.lanes is None or not self.sink_tokens:
            return len(hits)
        last = (self.sink_tokens - 1) // self.block_size
        if len(hits) <= last or hits[last] not in self.stash:
            return 0
        self.stash.move_to_end(hits[last])
        return len(hits)

    def stash_entry(self, block: int, create: bool) -> int | None:
        """The stash entry of a last-sink block (LRU; `create` takes the oldest entry when full)."""
        got = self.stash.get(block)
        if got is not None or not create:
            if got is not None:
                self.stash.move_to_end(block)
            return got
        assert self.lanes is not None
        entry = len(self.stash) if len(self.stash) < self.lanes.num_lanes else self.stash.popitem(last=False)[1]
        self.stash[block] = entry
        return entry

    def _stash_copy(self, layer: int, copy: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if copy is not None and self.lanes is not None:
            dst, src = copy
            self.lanes.k[layer][dst] = self.lanes.k[layer][src]
            self.lanes.v[layer][dst] = self.lanes.v[layer][src]

    # -- write -------------------------------------------------------------------

    @staticmethod
    def _as_bytes(codes: torch.Tensor) -> torch.Tensor:
        return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes

    def _write_slots(self, c: Codec, parts: list[torch.Tensor], slots: torch.Tensor, x: torch.Tensor) -> None:
        """Per-slot codec: encode x [T, H, D] into its slots (codes and stats)."""
        enc = c.encode(x)
        for dst, src in zip(parts, [self._as_bytes(enc.codes), enc.scale, enc.zero], strict=False):
            assert src is not None
            dst.view(-1, *dst.shape[2:]).index_copy_(0, slots, src)

    def _write_groups(self, c: Codec, parts: list[torch.Tensor], x: torch.Tensor, step: PolicyStep) -> None:
        """Token-grouped codec: x [G, g, H, D] complete groups -> codes into their slots, stats into rows."""
        assert step.group_valid is not None and step.group_slots is not None and step.group_stat_rows is not None
        # sink rows (read from their lane) are left out of the group's scale, but their codes are
        # stored too: a request that takes them from the prefix cache reads them as stored. A group of
        # sinks only is scaled by its own rows.
        valid = step.group_valid | ~step.group_valid.any(1, keepdim=True)
        enc = c.encode(x, stats_from=torch.where(valid[:, :, None, None], x, x[:, -1:]))
        codes = self._as_bytes(enc.codes)
        parts[0].view(-1, *parts[0].shape[2:]).index_copy_(0, step.group_slots.reshape(-1),
                                                           codes.reshape(-1, *codes.shape[2:]))
        copies = step.group_stat_rows.shape[1]
        rows = step.group_stat_rows.reshape(-1)
        for dst, src in zip(parts[1:], [enc.scale, enc.zero], strict=False):
            assert src is not None
            dst.index_copy_(0, rows, src[:, 0].repeat_interleave(copies, dim=0))

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [T] int64, k/v [T, Hkv, D] -> encoded into their slots (per-token codecs, no lanes)."""
        assert not self.grouped and self.lanes is None and not self.keys_pre_rope, "use store_step"
        self._write_slots(self.kc, self.k[layer], slots, k)
        self._write_slots(self.vc, self.v[layer], slots, v)

    def store_step(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   step: PolicyStep) -> torch.Tensor:
        """New tokens' post-RoPE k [T, Hkv, D] and v -> codes (per slot, or per completed group).

        Returns the keys as stored (pre-RoPE when `keys_pre_rope`) for `write_lanes`, which the
        caller runs after this step's reads (the ring still holds the rows they overlay)."""
        self._stash_copy(layer, step.sink_restore)  # a prefix hit's sinks into its lane, before the reads
        if self.keys_pre_rope:
            assert self.rope is not None
            cos, sin = self.rope(step.positions)
            k = _rotate(k, cos, sin, inverse=True)
        for c, parts, x, lane in ((self.kc, self.k[layer], k, self._lane(layer, "k")),
                                  (self.vc, self.v[layer], v, self._lane(layer, "v"))):
            if not c.token_grouped:
                self._write_slots(c, parts, slots, x)
            elif step.group_src is not None and step.group_src.numel():
                # groups read lane rows written by earlier steps: before this step overwrites the ring
                src = x if lane is None else torch.cat([lane, x])
                self._write_groups(c, parts, src[step.group_src], step)
        return k

    def write_lanes(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: PolicyStep) -> None:
        """The step's full-precision rows (k as returned by `store_step`) into their lanes."""
        if self.lanes is not None:
            self.lanes.k[layer].index_copy_(0, step.lane_rows, k.to(self.lanes.k[layer].dtype))
            self.lanes.v[layer].index_copy_(0, step.lane_rows, v.to(self.lanes.v[layer].dtype))
            self._stash_copy(layer, step.sink_save)  # sinks completed this step, for later prefix hits

    def _lane(self, layer: int, kind: str) -> torch.Tensor | None:
        if self.lanes is None:
            return None
        return (self.lanes.k if kind == "k" else self.lanes.v)[layer]

    # -- read --------------------------------------------------------------------

    def _dequant(self, c: Codec, parts: list[torch.Tensor], block_ids: torch.Tensor) -> torch.Tensor:
        """block_ids [..., M] -> [..., M * bs, H, D] at the model dtype."""
        codes = parts[0][block_ids].flatten(-4, -3)  # [..., M * bs, H, Dc]
        if not c.is_quantized:
            return codes.to(c.fp_dtype)
        if c.dtype == "fp8":
            codes = codes.view(torch.float8_e4m3fn)
        if c.token_grouped:
            per_block = self.stat_rows_per_block(c)
            sub = torch.arange(self.block_size, device=block_ids.device) // max(1, c.group_size)
            if c.group_size > self.block_size:
                sub = torch.zeros_like(sub)
            rows = (block_ids[..., :, None] * per_block + sub).flatten(-2)  # [..., M * bs]
            scale, zero = parts[1][rows], (parts[2][rows] if len(parts) > 2 else None)  # [..., M * bs, Hs, Ds]
        else:
            scale = c._expand_row_stat(parts[1][block_ids].flatten(-4, -3))
            zero = c._expand_row_stat(parts[2][block_ids].flatten(-4, -3)) if len(parts) > 2 else None
        return c.dequantize(codes, scale, zero)

    def gather(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids [..., M] int64 -> dequantized k, v [..., M * block_size, Hkv, D] (no overlays)."""
        return self._dequant(self.kc, self.k[layer], block_ids), self._dequant(self.vc, self.v[layer], block_ids)

    def codec_rows(self, layer: int, seq: Any, block_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' codes; a token-grouped codec's incomplete last group (not encoded yet: its rows are in
        the lane) is encoded from its lane rows padded with the last one, as the evaluator encodes it."""
        k, v = self.gather(layer, block_ids)
        k, v = k[:n].clone(), v[:n].clone()
        lo = (n // self.chunk) * self.chunk
        if self.lanes is None or lo == n or seq.num_kv_slots >= lo + self.chunk:  # complete: encoded already
            return k, v
        pos = np.arange(lo, n)
        rows = torch.from_numpy(_Lane(self, self.lane(seq)).rows(pos)).to(k.device)
        keep = torch.from_numpy(pos >= self.sink_tokens).to(k.device)[:, None, None]  # sinks: not in the scale
        for c, out, lane in ((self.kc, k, self.lanes.k[layer]), (self.vc, v, self.lanes.v[layer])):
            if c.token_grouped:
                x = lane[rows].to(c.fp_dtype)  # [n - lo, H, D]
                pad = x[-1:].expand(self.chunk - (n - lo), *x.shape[1:])
                stats = torch.cat([torch.where(keep, x, x[-1:]), pad]) if bool(keep.any()) else None
                out[lo:n] = c.decode(c.encode(torch.cat([x, pad]), stats_from=stats))[: n - lo]
        return k, v

    def fused_decode(self, kernels: Any, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     tables: torch.Tensor, context_lens: torch.Tensor, step: PolicyStep) -> torch.Tensor | None:
        """int8/int4 codes (keys not pre-RoPE; rotated keys score q R): `kernels.quant_decode_attention`
        dequantizes each row as it reads it, with the lane rows and the decodes' own k/v where `read` would
        overlay them."""
        kc, vc = self.kc, self.vc
        if (self.keys_pre_rope or kc.dtype != vc.dtype or kc.dtype not in ("int4", "int8")
                or q.dtype != kc.fp_dtype):
            return None
        bd, _, d = q.shape
        lanes = self.lanes
        if step.decode_lane_map is None:  # the step's overlay as a per-slot map, once for all layers
            lane_map = torch.full((bd, tables.shape[1] * self.block_size), -1, dtype=torch.long, device=q.device)
            if lanes is not None and step.decode_overlay is not None and step.decode_overlay[0].numel():
                dst, src = step.decode_overlay
                if kc.rotated:  # only the rows read get rotated: index them compactly
                    step.decode_lane_rows, src = torch.unique(src, return_inverse=True)
                lane_map.view(-1)[dst] = src
            step.decode_lane_map = lane_map
        none = q.new_zeros(0, kc.num_heads, d)
        lane_k, lane_v = (lanes.k[layer], lanes.v[layer]) if lanes is not None else (none, none)
        if kc.rotated:  # stored keys are y = k R: score (q R) . y, and the full-precision key rows rotated alike
            r = hadamard_rotation(d, q.device).to(q.dtype)
            used = step.decode_lane_rows
            lane_k, lane_v = (lane_k[used] @ r, lane_v[used]) if used is not None else (none, none)
            q, k = q @ r, k @ r
        ks, vs = self.k[layer], self.v[layer]  # [codes, scale, zero] each
        out: torch.Tensor = kernels.quant_decode_attention(
            q, 4 if kc.dtype == "int4" else 8, ks[0], ks[1], ks[2], kc.token_grouped, kc.group_size,
            vs[0], vs[1], vs[2], vc.token_grouped, vc.group_size, lane_k, lane_v, step.decode_lane_map,
            k.contiguous(), v.contiguous(), tables, context_lens, d ** -0.5)
        return out  # [Bd, Hq, D]

    def read(self, layer: int, block_ids: torch.Tensor, overlay: tuple[torch.Tensor, torch.Tensor] | None,
             positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`gather` + the full-precision lane rows (sinks, tail) + RoPE for pre-RoPE keys.

        overlay: (dst rows of the flattened [prod(...) * M * bs] result, lane rows); positions: logical
        position of every gathered slot (shape of the result's leading dims), needed for pre-RoPE keys.
        """
        k, v = self.gather(layer, block_ids)
        if overlay is not None and self.lanes is not None and overlay[0].numel():
            dst, src = overlay
            h, d = k.shape[-2:]
            k.view(-1, h, d)[dst] = self.lanes.k[layer][src].to(k.dtype)
            v.view(-1, h, d)[dst] = self.lanes.v[layer][src].to(v.dtype)
        if self.keys_pre_rope:
            assert self.rope is not None and positions is not None
            cos, sin = self.rope(positions.reshape(-1))
            h, d = k.shape[-2:]
            k = _rotate(k.reshape(-1, h, d), cos, sin, inverse=False).view(k.shape)
        return k, v
