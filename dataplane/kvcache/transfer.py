"""KV blocks and lanes as bytes, exactly as stored: what crosses the wire between prefill and decode.

A block's payload is the concatenation, layer by layer, of every tensor row the cache keeps for
that block — `[block_size, Hkv, D]` K and V for a plain cache; codes, scales and zeros (per slot,
or the block's rows of token-grouped stats) for a quantized one. Nothing is dequantized: an int4
policy moves int4 bytes. A lane payload is a running sequence's full-precision sink and ring rows.

The receiving cache must have the same layout (`layout(cache)` equal on both sides); `write_block`
and `write_lane` check the payload size. A CRC-32 per payload catches corruption in transit.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from kvfleet.dataplane.kvcache.keys import checksum

__all__ = ["block_views", "checksum", "layout", "lane_views", "read_block", "read_lane", "write_block",
           "write_lane"]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a contiguous tensor (fp8 and bf16 included), flattened."""
    return t.contiguous().view(torch.uint8).reshape(-1)


def block_views(cache: Any, block: int) -> list[torch.Tensor]:
    """Every tensor slice that holds `block`'s KV, in a fixed order (views, no copies)."""
    views: list[torch.Tensor] = []
    nb = cache.num_blocks
    for layer in range(cache.num_layers):
        for kind in (cache.k, cache.v):
            parts = kind[layer] if isinstance(kind[layer], list) else [kind[layer]]
            for t in parts:
                if t.shape[0] == nb:  # [num_blocks, block_size, ...]
                    views.append(t[block])
                else:  # token-grouped stats: rows_per_block rows per block
                    rows = t.shape[0] // nb
                    views.append(t[block * rows:(block + 1) * rows])
    return views


def lane_views(cache: Any, lane: int) -> list[torch.Tensor]:
    """The full-precision rows of one lane (sinks + ring) of every layer; [] without lanes."""
    lanes = getattr(cache, "lanes", None)
    if lanes is None:
        return []
    lo, hi = lane * lanes.width, (lane + 1) * lanes.width
    return [t[lo:hi] for layer in range(cache.num_layers) for t in (lanes.k[layer], lanes.v[layer])]


def _read(views: list[torch.Tensor]) -> bytes:
    if not views:
        return b""
    return torch.cat([_as_bytes(v) for v in views]).cpu().numpy().tobytes()


def _write(views: list[torch.Tensor], payload: bytes, what: str) -> None:
    want = sum(v.numel() * v.element_size() for v in views)
    if len(payload) != want:
        raise ValueError(f"{what}: payload of {len(payload)} bytes, the local layout needs {want}")
    src = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    off = 0
    for v in views:
        n = v.numel() * v.element_size()
        v.view(torch.uint8).view(-1).copy_(src[off:off + n].to(v.device))
        off += n


def read_block(cache: Any, block: int) -> bytes:
    return _read(block_views(cache, block))


def write_block(cache: Any, block: int, payload: bytes) -> None:
    _write(block_views(cache, block), payload, f"block {block}")


def read_lane(cache: Any, lane: int) -> bytes:
    return _read(lane_views(cache, lane))


def write_lane(cache: Any, lane: int, payload: bytes) -> None:
    _write(lane_views(cache, lane), payload, f"lane {lane}")


def layout(cache: Any) -> str:
    """A description of how a block and a lane are stored; sender and receiver must agree on it."""
    block = [(str(v.dtype), list(v.shape)) for v in block_views(cache, 0)]
    lane = [(str(v.dtype), list(v.shape)) for v in lane_views(cache, 0)]
    extra = {k: getattr(cache, k) for k in ("sink_tokens", "residual_tokens", "keys_pre_rope") if hasattr(cache, k)}
    return json.dumps({"kind": type(cache).__name__, "block_size": cache.block_size, "block": block,
                       "lane": lane, **extra}, sort_keys=True, separators=(",", ":"))
