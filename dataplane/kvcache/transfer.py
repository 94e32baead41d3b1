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

import torch
from kvfleet.dataplane.kvcache.keys import checksum

from .storage import KVStorage

__all__ = ["block_views", "checksum", "layout", "lane_views", "read_block", "read_lane", "write_block",
           "write_lane"]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a contiguous tensor (fp8 and bf16 included), flattened."""
    return t.contiguous().view(torch.uint8).reshape(-1)


def block_views(cache: KVStorage, block: int) -> list[torch.Tensor]:
    """Every tensor slice that holds `block`'s KV, in a fixed order (views, no copies)."""
    return cache.block_views(block)


def lane_views(cache: KVStorage, lane: int) -> list[torch.Tensor]:
    """The full-precision rows of one lane (sinks + ring) of every layer; [] without lanes."""
    return cache.lane_views(lane)


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


def read_block(cache: KVStorage, block: int) -> bytes:
    return _read(block_views(cache, block))


def write_block(cache: KVStorage, block: int, payload: bytes) -> None:
    _write(block_views(cache, block), payload, f"block {block}")
    if cache.hidden is not None:  # KV from elsewhere comes without this engine's hidden states
        cache.hidden.invalidate(block)


def read_lane(cache: KVStorage, lane: int) -> bytes:
    return _read(lane_views(cache, lane))


def write_lane(cache: KVStorage, lane: int, payload: bytes) -> None:
    _write(lane_views(cache, lane), payload, f"lane {lane}")


def layout(cache: KVStorage) -> str:
    """A description of how a block and a lane are stored; sender and receiver must agree on it."""
    block = [(str(v.dtype), list(v.shape)) for v in block_views(cache, 0)]
    lane = [(str(v.dtype), list(v.shape)) for v in lane_views(cache, 0)]
    extra = cache.layout_facts()
    return json.dumps({"kind": type(cache).__name__, "block_size": cache.block_size, "block": block,
                       "lane": lane, **extra}, sort_keys=True, separators=(",", ":"))
