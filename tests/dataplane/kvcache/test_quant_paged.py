"""Quantized paged blocks: a drop-in storage for the paged backend, equal to PolicyAttention's codec."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.kvcache.paged import PagedAttention, PagedMetadata, PrefillChunk
from kvfleet.dataplane.kvcache.policy import PolicyAttention, PolicySpec, QuantSpec
from kvfleet.dataplane.kvcache.quant import Codec, PagedQuantKV, paged_codec
from kvfleet.dataplane.model.attention import causal_attention

L, HQ, H, D, BS = 2, 4, 2, 16, 4


def _meta_prefill(t: int, slots: torch.Tensor) -> PagedMetadata:
    return PagedMetadata(slot_mapping=slots, num_decodes=0, decode_block_tables=None, decode_mask=None,
                         prefills=[PrefillChunk(q_start=0, q_len=t, context_len=t, block_ids=None)])


def _meta_decode(ctx: int, blocks: torch.Tensor) -> PagedMetadata:
    slot = blocks[(ctx - 1) // BS] * BS + (ctx - 1) % BS
    mask = torch.zeros(1, 1, 1, len(blocks) * BS, dtype=torch.bool)
    mask[..., :ctx] = True
    return PagedMetadata(slot_mapping=slot.view(1), num_decodes=1, decode_block_tables=blocks[None],
                         decode_mask=mask, prefills=[])


@pytest.mark.parametrize("dtype", ["fp8", "int8", "int4", "bf16"])
def test_paged_quantized_attention_matches_policy_attention(dtype: str) -> None:
    spec = PolicySpec(QuantSpec(dtype, "per-token", "per-token", group_size=8) if dtype != "fp8"
                      else QuantSpec(dtype, "per-head", "per-head", group_size=8))
    ref = PolicyAttention(spec, L, H, D)
    kc = paged_codec(ref.kc)
    # the reference uses the same token-local codec as the paged blocks
    ref.kc, ref.vc = kc, paged_codec(ref.vc)
    blocks = torch.tensor([5, 2, 7, 0])  # non-contiguous on purpose
    cache = PagedQuantKV(ref.kc, ref.vc, L, num_blocks=8, block_size=BS)
    paged = PagedAttention(cache)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    t = 9
    slots = torch.cat([blocks[i // BS:i // BS + 1] * BS + i % BS for i in range(t)])
    steps = [(_meta_prefill(t, slots), t)] + [(_meta_decode(t + i + 1, blocks), 1) for i in range(4)]
    for meta, n in steps:
        paged.set_metadata(meta)
        for layer in range(L):
            q, k, v = (torch.randn(n, hh, D, generator=g) for hh in (HQ, H, H))
            a, b = paged.attend(layer, q, k, v), ref.attend(layer, q, k, v)
            if n > 1:  # prefill: the chunk attends its own K/V at full precision in both
                assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
                continue
            # paged decode reads the new token back from its (quantized) slot too
            ks, vs = ref.layers[layer].materialize()
            want = causal_attention(q, ks, vs, q_offset=ks.shape[0] - 1)
            assert torch.allclose(a, want, atol=1e-5), (a - want).abs().max()


def test_paged_bytes_per_block_equals_allocated() -> None:
    kc, vc = Codec("int4", "per-channel", 8, H, D), Codec("int4", "per-token", 8, H, D)
    cache = PagedQuantKV(kc, vc, L, num_blocks=3, block_size=BS)
    assert cache.nbytes() == 3 * PagedQuantKV.bytes_per_block(kc, vc, L, BS)
    assert paged_codec(kc).granularity == "per-token"
    fp8 = paged_codec(Codec("fp8", "per-head", 32, H, D))
    assert fp8.granularity == "per-token" and fp8.group_size == D  # one scale per token per head
