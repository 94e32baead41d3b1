"""Blocks from elsewhere (the memory pool's path): engine A's exported prompt blocks, imported into
engine B's prefix cache, are taken by B's next request as prefix hits and give the tokens a local prefix
hit gives (a cold run's for fp32; blocks cross as stored for a quantized policy); what cannot be
imported is computed instead."""

from __future__ import annotations

from dataclasses import replace

import pytest
from engine_testlib import greedy, make_engine, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig
from kvfleet.dataplane.engine.api import GenerationRequest
from kvfleet.dataplane.engine.handoff import import_blocks, num_cached_blocks, prompt_block_hashes

POLICIES = {
    "fp32": CachePolicyConfig(),
    "int8-per-token": CachePolicyConfig(key_quantization="int8", value_quantization="int8", group_size=8),
}


def _export(engine, prompt):
    engine.add_request(GenerationRequest("x", prompt, replace(greedy(1), max_tokens=1), export_kv=True))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    assert out is not None and out.kv is not None
    return out.kv


@pytest.mark.parametrize("name", list(POLICIES))
def test_imported_blocks_are_prefix_hits_with_the_same_tokens(tiny, name):
    cp = POLICIES[name]
    prompt = random_prompt(tiny[1].vocab_size, 37, seed=3)
    a, b = make_engine(tiny[0], tiny[1], cp), make_engine(tiny[0], tiny[1], cp)
    cold = a.generate([prompt], greedy(12))[0].new_token_ids
    # what a local prefix hit gives (a quantized hit reads the blocks as stored, a cold prefill its own rows)
    want = a.generate([prompt], greedy(12))[0].new_token_ids
    if name == "fp32":
        assert want == cold
    kv = _export(make_engine(tiny[0], tiny[1], cp), prompt)
    req = GenerationRequest("r", prompt, greedy(12))
    hashes = prompt_block_hashes(b, req)
    assert len(hashes) == (len(prompt) - 1) // b.scheduler.bm.block_size
    assert [blk.block_hash for blk in kv.blocks[:len(hashes)]] == hashes  # exporter and importer hash alike
    assert num_cached_blocks(b, hashes) == 0
    n = import_blocks(b, [(blk.block_hash, blk.payload) for blk in kv.blocks[:len(hashes)]])
    assert n == len(hashes) and num_cached_blocks(b, hashes) == n
    b.scheduler.bm.check_invariants()
    computed0 = b.prompt_tokens_computed
    out = b.generate([prompt], greedy(12))[0]
    assert out.new_token_ids == want
    hits = n - n % b.scheduler.hit_align_blocks  # a hit never splits a token group spanning blocks
    assert out.num_cached_prompt_tokens == hits * b.scheduler.bm.block_size > 0
    assert b.prompt_tokens_computed - computed0 == len(prompt) - hits * b.scheduler.bm.block_size


def test_import_stops_at_what_cannot_be_taken(tiny):
    cp = CachePolicyConfig()
    prompt = random_prompt(tiny[1].vocab_size, 37, seed=4)
    kv = _export(make_engine(tiny[0], tiny[1], cp), prompt)
    b = make_engine(tiny[0], tiny[1], cp)
    hashes = prompt_block_hashes(b, GenerationRequest("r", prompt, greedy(4)))
    blocks = [(blk.block_hash, blk.payload) for blk in kv.blocks[:len(hashes)]]
    blocks[3] = (blocks[3][0], blocks[3][1][:-4])  # a payload of another size (another layout)
    assert import_blocks(b, blocks) == 3
    assert num_cached_blocks(b, hashes) == 3
    assert import_blocks(b, blocks[:3]) == 3  # already held: counted, not copied again
    b.scheduler.bm.check_invariants()
