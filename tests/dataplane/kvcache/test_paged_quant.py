"""Quantized paged storage: allocated bytes, batched group encoding, per-slot round trips."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.kvcache.paged_quant import FullPrecisionLanes, PagedQuantKV
from kvfleet.dataplane.kvcache.quant import Codec

L, H, D, BS = 2, 2, 16, 4


@pytest.mark.parametrize("kc,vc", [
    (Codec("int4", "per-token", 8, H, D), Codec("int4", "per-token", 8, H, D)),
    (Codec("int8", "per-channel", 2, H, D), Codec("int8", "per-token", 2, H, D)),  # 2 groups per block
    (Codec("int4", "per-channel", 8, H, D), Codec("int4", "per-token", 8, H, D)),  # a group spans 2 blocks
    (Codec("fp8", "per-head", 4, H, D), Codec("fp8", "per-tensor", 4, H, D)),
])
def test_bytes_per_block_and_lanes_equal_what_is_allocated(kc: Codec, vc: Codec) -> None:
    bare = PagedQuantKV(kc, vc, L, num_blocks=3, block_size=BS)
    assert bare.lanes is None or bare.chunk > 1
    with_lanes = PagedQuantKV(kc, vc, L, num_blocks=3, block_size=BS, sink_tokens=4, residual_tokens=6, num_lanes=5)
    blocks = 3 * PagedQuantKV.bytes_per_block(kc, vc, L, BS)
    lanes = FullPrecisionLanes.bytes_needed(L, 5, 4, with_lanes.ring_tokens, H, D, torch.float32)
    assert with_lanes.ring_tokens == 6 + max(kc.chunk_tokens, vc.chunk_tokens) - 1
    assert with_lanes.nbytes() == blocks + lanes
    if bare.lanes is None:
        assert bare.nbytes() == blocks


def test_group_sizes_that_do_not_divide_the_block_are_rejected() -> None:
    with pytest.raises(ValueError, match="must divide one another"):
        PagedQuantKV(Codec("int8", "per-channel", 6, H, D), Codec("int8", "per-token", 8, H, D), L, 2, BS)


@pytest.mark.parametrize("codec", [Codec("int8", "per-channel", 4, H, D), Codec("int4", "per-channel", 4, H, D),
                                   Codec("fp8", "per-head", 4, H, D), Codec("int8", "per-token", 8, H, D)])
def test_batched_encode_equals_one_group_at_a_time(codec: Codec) -> None:
    x = torch.randn(3, 4, H, D, generator=torch.Generator().manual_seed(0)) * 3
    batched = codec.encode(x)
    for i in range(3):
        one = codec.encode(x[i])
        assert torch.equal(batched.codes[i], one.codes)
        assert one.scale is not None and batched.scale is not None
        assert torch.equal(batched.scale[i], one.scale)
        assert one.zero is None or (batched.zero is not None and torch.equal(batched.zero[i], one.zero))


@pytest.mark.parametrize("dtype,bound", [("int8", 0.02), ("int4", 0.3), ("fp8", 0.15)])
def test_per_slot_store_then_gather_round_trips_within_the_codec_error(dtype: str, bound: float) -> None:
    c = Codec(dtype, "per-token", 8, H, D)
    cache = PagedQuantKV(c, c, L, num_blocks=4, block_size=BS)
    x = torch.randn(7, H, D, generator=torch.Generator().manual_seed(1))
    blocks = torch.tensor([3, 0])
    slots = torch.cat([blocks[i // BS:i // BS + 1] * BS + i % BS for i in range(7)])
    cache.store(1, slots, x, -x)
    k, v = cache.gather(1, blocks)  # [8, H, D]
    assert torch.allclose(k[:7], c.decode(c.encode(x))) and torch.allclose(v[:7], -x, atol=bound)
    assert (k[:7] - x).abs().max() < bound
