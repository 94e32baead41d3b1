"""One constructor from a CachePolicy: `kv_storage_spec` -> sizes and facts, then `allocate` -> `KVStorage`.

    spec = kv_storage_spec(cp, num_layers, block_size, num_kv_heads, head_dim, dtype, num_lanes)
    num_blocks = (budget - spec.lane_bytes) // spec.bytes_per_block
    kv = spec.allocate(num_blocks, device, rope)

The spec carries what the engine needs before and besides the tensors: bytes per block and of the
full-precision lanes (to size the cache), the prefix-cache key suffix (KV of another codec is never
a hit) and the hit alignment (a hit never splits a token group that spans blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .paged import PagedKVCache
from .paged_quant import FullPrecisionLanes, PagedQuantKV, RopeFn
from .policy import PolicySpec, build_codecs
from .quant import Codec
from .storage import KVStorage


@dataclass(frozen=True)
class KVStorageSpec:
    """How one CachePolicy stores one model's KV, known before anything is allocated."""

    policy: PolicySpec
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    num_lanes: int  # sequences that can run at once (each holds full-precision sink/residual rows)
    codecs: tuple[Codec, Codec] | None  # (keys, values); None = stored at the model dtype
    bytes_per_block: int  # K + V bytes of one block, all layers, as allocated
    lane_bytes: int  # bytes of the full-precision lanes (0 without sinks or a residual ring)
    prefix_key_suffix: str  # appended to a sequence's prefix-cache key: "" or "|kv=<key>/<value>"
    hit_align_blocks: int  # prefix-cache hits are whole multiples of this many blocks

    def allocate(self, num_blocks: int, device: torch.device | str, rope: RopeFn | None = None) -> KVStorage:
        """The storage: `PagedKVCache`, or `PagedQuantKV` when quantized (rope: needed for keysPreRope)."""
        if self.codecs is None:
            return PagedKVCache(self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim,
                                self.dtype, device)
        q = self.policy.quant
        return PagedQuantKV(*self.codecs, self.num_layers, num_blocks, self.block_size, device,
                            sink_tokens=q.sink_tokens, residual_tokens=q.residual_tokens, num_lanes=self.num_lanes,
                            keys_pre_rope=q.keys_pre_rope, rope=rope)


def kv_storage_spec(cp: Any, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, num_lanes: int = 1) -> KVStorageSpec:
    """The storage spec of the engine's `CachePolicyConfig` `cp`; raises if the engine cannot serve it."""
    cp.check_servable()
    spec = PolicySpec.from_config(cp)
    dims = (num_layers, block_size, num_kv_heads, head_dim, dtype, num_lanes)
    if (cp.key_quantization, cp.value_quantization) == ("none", "none"):
        per_block = PagedKVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        return KVStorageSpec(spec, *dims, None, per_block, 0, "", 1)
    kc, vc = build_codecs(spec, num_kv_heads, head_dim, dtype)
    q = spec.quant
    ring = q.residual_tokens + max(kc.chunk_tokens, vc.chunk_tokens) - 1
    lanes = 0 if not ring and not q.sink_tokens else \
        FullPrecisionLanes.bytes_needed(num_layers, num_lanes, q.sink_tokens, ring, num_kv_heads, head_dim, dtype)
    grouped = cp.token_grouped("key") or cp.token_grouped("value")
    return KVStorageSpec(spec, *dims, (kc, vc), PagedQuantKV.bytes_per_block(kc, vc, num_layers, block_size),
                         lanes, f"|kv={cp.key_quantization}{'+rot' if cp.rotate_keys else ''}/{cp.value_quantization}",
                         max(1, cp.group_size // block_size) if grouped else 1)


def paged_bytes_per_block(cp: Any, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                          dtype: torch.dtype) -> int:
    """K+V bytes of one paged block under `cp`."""
    return kv_storage_spec(cp, num_layers, block_size, num_kv_heads, head_dim, dtype).bytes_per_block
