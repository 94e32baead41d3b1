"""What names and protects one KV block outside the engine that computed it. Torch-free.

A full block's identity is its prefix hash chain (`blocks.hash_block`: blake2b over the parent's
hash, the block's token ids and the engine's extra key), carried between processes as 16
little-endian bytes. In the memory pool that hash is further namespaced by the model family and
the KV layout (`transfer.layout`: codec, block size, dtype, shapes), so a block is only ever handed
to an engine that stores KV exactly the same way: `PoolKey`. Every payload that leaves an engine
travels with its CRC-32 (`checksum`).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

HASH_BYTES = 16  # blocks.hash_block is a 128-bit blake2b digest


def checksum(payload: bytes) -> int:
    """CRC-32 of a payload (zlib's polynomial)."""
    return zlib.crc32(payload) & 0xFFFFFFFF


def hash_to_bytes(block_hash: int) -> bytes:
    """A block's chain hash as it crosses the wire (`KVChunk.block_hash`, the pool's keys)."""
    return block_hash.to_bytes(HASH_BYTES, "little")


def hash_from_bytes(raw: bytes) -> int:
    if len(raw) != HASH_BYTES:
        raise ValueError(f"a block hash is {HASH_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "little")


def prefix_extra_key(variant: str, weights_id: str = "", codec: str = "") -> str:
    """The extra key every prefix-cache hash of a sequence is chained with (`blocks.hash_block`).

    variant: the ModelVariant the tokens are computed for; weights_id: a content hash of the weights
    that differ from the base (a LoRA adapter, a full fine-tune), empty for the base;
    codec: how KV is stored (`KVStorageSpec.prefix_key_suffix`). Variants (and re-trained weights under
    one variant name) never read each other's KV, here or through the memory pool.
    """
    return variant + (f"@{weights_id}" if weights_id else "") + codec


class PoolKey(NamedTuple):
    """A block in the memory pool: (model family, KV layout, prefix hash as 16 bytes)."""

    family: str
    layout: str
    block_hash: bytes
