"""Prefill -> decode hand-off between two engines: the decode engine continues exactly where prefill stopped.

For the plain cache and quantized policies (lanes, groups spanning blocks, pre-RoPE keys), prefill in
one engine + decode in another gives the same greedy tokens as one colocated engine; a corrupted or
missing hand-off is recomputed and still gives the same tokens (fp32); reservations refuse when the
decode engine is full and free everything on release, abort and finish.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from engine_testlib import greedy, make_engine, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig
from kvfleet.dataplane.engine.api import GenerationRequest, KVBlock, SamplingParams
from kvfleet.dataplane.kvcache.build import paged_bytes_per_block

POLICIES = {
    "fp32": CachePolicyConfig(),
    "int8-kivi-lanes": CachePolicyConfig(key_quantization="int8", value_quantization="int8",
                                         key_granularity="per-channel", group_size=2, residual_tokens=3,
                                         quant_sink_tokens=2),
    "int4-groups-span-blocks-pre-rope": CachePolicyConfig(key_quantization="int4", value_quantization="int4",
                                                          group_size=8, residual_tokens=5, quant_sink_tokens=8,
                                                          keys_pre_rope=True),
}


def _prefill(engine, rid: str, prompt: list[int], sp: SamplingParams):
    """Run prefill only (max_tokens=1, KV exported); returns the final output carrying the hand-off."""
    engine.add_request(GenerationRequest(rid, prompt, replace(sp, max_tokens=1), export_kv=True))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    assert outs[-1].finished and outs[-1].kv is not None
    return outs[-1]


def _decode(engine, rid: str, prompt: list[int], sp: SamplingParams, first: int, kv, reserve: bool = True):
    if reserve:
        assert engine.reserve(rid, len(prompt), sp.max_tokens)
    recomputed = engine.add_prefilled(GenerationRequest(rid, prompt, sp), first, kv)
    toks = []
    while engine.has_unfinished():
        for o in engine.step():
            toks += o.new_token_ids
    return [first] + toks, recomputed


@pytest.mark.parametrize("name", list(POLICIES))
def test_disaggregated_equals_colocated(tiny, name):
    cp = POLICIES[name]
    prompts = [random_prompt(tiny[1].vocab_size, n, seed=n) for n in (13, 26, 7)]
    want = [o.new_token_ids for o in make_engine(tiny[0], tiny[1], cp).generate(prompts, greedy(20))]
    pre, dec = make_engine(tiny[0], tiny[1], cp), make_engine(tiny[0], tiny[1], cp)
    for i, p in enumerate(prompts):
        out = _prefill(pre, f"r{i}", p, greedy(20))
        assert out.kv.num_tokens == len(p) and len(out.kv.blocks) == -(-len(p) // 4)
        got, recomputed = _decode(dec, f"r{i}", p, greedy(20), out.new_token_ids[0], out.kv)
        assert not recomputed and got == want[i], name
    for eng in (pre, dec):
        eng.scheduler.bm.check_invariants()
        assert eng.scheduler.bm.num_used_blocks == 0 and not eng.reservations.tables


def test_blocks_travel_as_stored(tiny):
    """Each block's payload is exactly the bytes the cache allocates per block: int8 moves int8 codes."""
    mc = tiny[1]
    p = random_prompt(mc.vocab_size, 32, seed=1)
    sizes = {}
    for name in ("fp32", "int8-kivi-lanes"):
        cp = POLICIES[name]
        kv = _prefill(make_engine(tiny[0], mc, cp), "r", p, greedy(4)).kv
        per_block = paged_bytes_per_block(cp, mc.num_hidden_layers, 4, mc.num_key_value_heads, mc.head_dim,
                                          torch.float32)
        assert {len(b.payload) for b in kv.blocks} == {per_block}
        sizes[name] = per_block
        assert bool(kv.lane) == (name != "fp32")  # lanes (sinks + residual ring) travel with quantized KV
    assert sizes["int8-kivi-lanes"] < sizes["fp32"]  # codes + scales (head_dim 16: scales weigh a lot)


def test_seeded_sampling_continues_the_same_random_stream(tiny):
    cp = CachePolicyConfig()
    p = random_prompt(tiny[1].vocab_size, 11, seed=3)
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    want = make_engine(tiny[0], tiny[1], cp).generate([p], sp)[0].new_token_ids
    out = _prefill(make_engine(tiny[0], tiny[1], cp), "r", p, sp)
    assert out.kv.rng_state
    got, _ = _decode(make_engine(tiny[0], tiny[1], cp), "r", p, sp, out.new_token_ids[0], out.kv)
    assert got == want


@pytest.mark.parametrize("damage", ["corrupt-block", "no-kv", "other-layout"])
def test_unusable_handoff_is_recomputed_with_the_same_output(tiny, damage):
    cp = CachePolicyConfig()
    p = random_prompt(tiny[1].vocab_size, 21, seed=5)
    want = make_engine(tiny[0], tiny[1], cp).generate([p], greedy(10))[0].new_token_ids
    out = _prefill(make_engine(tiny[0], tiny[1], cp), "r", p, greedy(10))
    kv = out.kv
    if damage == "corrupt-block":
        b = kv.blocks[2]
        bad = bytearray(b.payload)
        bad[17] ^= 0xFF
        kv = replace(kv, blocks=[*kv.blocks[:2], KVBlock(b.index, b.block_hash, bytes(bad), b.crc32), *kv.blocks[3:]])
    elif damage == "no-kv":
        kv = None
    else:
        kv = replace(kv, layout=kv.layout.replace("PagedKVCache", "PagedQuantKV"))
    dec = make_engine(tiny[0], tiny[1], cp)
    got, recomputed = _decode(dec, "r", p, greedy(10), out.new_token_ids[0], kv, reserve=damage != "no-kv")
    assert recomputed and got == want
    dec.scheduler.bm.check_invariants()
    assert dec.scheduler.bm.num_used_blocks == 0


def test_reservations_refuse_when_full_and_free_on_release_and_abort(tiny):
    dec = make_engine(tiny[0], tiny[1], CachePolicyConfig(), num_kv_blocks=10, max_num_seqs=4)
    assert dec.reserve("a", 16, 4)  # 4 blocks
    assert dec.reserve("b", 16, 4)  # 8 blocks used; 2 left
    assert not dec.reserve("c", 16, 4)  # no room: a retryable refusal, nothing held
    assert dec.scheduler.bm.num_used_blocks == 8
    assert dec.release_reservation("a") and not dec.release_reservation("a")
    dec.abort("b")
    assert dec.scheduler.bm.num_used_blocks == 0 and not dec.reservations.tables
    for i in range(4):
        assert dec.reserve(f"s{i}", 2, 1)
    assert not dec.reserve("s4", 2, 1)  # out of seats (max_num_seqs)
    assert not dec.reservations.expire(dec)  # within their deadline
    assert dec.reservations.expire(dec, now=time.monotonic() + 61) and dec.scheduler.bm.num_used_blocks == 0
