"""A prefix-cache hit under token-grouped key scales with full-precision sinks reads what a cold run reads.

Regression (issue 19): int8/int4 keys per-channel, `sinkTokens` not a multiple of `groupSize` (the
`int8-shared` example: sinks 4, groups 32) and a prefix hit made SmolLM2's output collapse: the hit
read the sink slots as stored, and the stored codes of sink rows were another token's. Now a prompt
that computes its sinks saves their full-precision rows (a stash keyed by its last sink block) and a
hit copies them into its lane; a hit whose sinks are not stashed is not taken.

With residualTokens 0 and groups inside a block, a hit holds no full-precision tail rows, so the
second request must equal the evaluator fed the same chunks (the cached prefix, then the rest).
"""

from __future__ import annotations

import pytest
from engine_testlib import greedy, greedy_through, make_engine, policy_attention, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig
from kvfleet.dataplane.engine.api import GenerationRequest

BS = 4


def _q(dtype: str, **kw) -> CachePolicyConfig:
    return CachePolicyConfig(key_quantization=dtype, value_quantization=dtype, key_granularity="per-channel", **kw)


CASES = {
    "int8-sinks-3-group-8": _q("int8", group_size=8, residual_tokens=4, quant_sink_tokens=3),
    "int4-sinks-5-group-4": _q("int4", group_size=4, residual_tokens=3, quant_sink_tokens=5),
    "int8-sinks-4-group-4": _q("int8", group_size=4, residual_tokens=2, quant_sink_tokens=4),
    "int4-sinks-2-group-8-pre-rope": _q("int4", group_size=8, residual_tokens=4, quant_sink_tokens=2,
                                        keys_pre_rope=True),
}
HIT_CASES = {
    "int8-sinks-3-group-4": _q("int8", group_size=4, quant_sink_tokens=3),
    "int4-sinks-5-group-2": _q("int4", group_size=2, quant_sink_tokens=5),
    "int4-sinks-4-group-4": _q("int4", group_size=4, quant_sink_tokens=4),
    "int4-sinks-1-group-4-pre-rope": _q("int4", group_size=4, quant_sink_tokens=1, keys_pre_rope=True),
}


def _run(engine, rid: str, prompt: list[int], n: int) -> tuple[list[int], int]:
    engine.add_request(GenerationRequest(rid, prompt, greedy(n)))
    out: list[int] = []
    hit = 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                out += o.new_token_ids  # each step's output holds the step's new tokens
        seq = engine.seqs.get(rid)
        if seq is not None:
            hit = max(hit, seq.num_hit_blocks)
    return out, hit


@pytest.mark.parametrize("name", list(CASES))
def test_cold_run_equals_policy_attention(tiny, name):
    cp = CASES[name]
    prompt = random_prompt(tiny[1].vocab_size, 29, seed=7)
    engine = make_engine(tiny[0], tiny[1], cp, block_size=BS, num_kv_blocks=256)
    got = engine.generate([prompt], greedy(16))[0].new_token_ids
    assert got == greedy_through(tiny[0], policy_attention(tiny[0], tiny[1], cp), prompt, 16)


@pytest.mark.parametrize("name", list(HIT_CASES))
def test_second_request_on_a_prefix_hit_equals_policy_attention_fed_the_same_chunks(tiny, name):
    cp = HIT_CASES[name]
    shared = random_prompt(tiny[1].vocab_size, 24, seed=3)
    first, second = shared + [11, 12, 13], shared + [21, 22, 23, 24, 25]
    engine = make_engine(tiny[0], tiny[1], cp, block_size=BS, num_kv_blocks=256)
    _run(engine, "a", first, 8)
    got, hit = _run(engine, "b", second, 16)
    assert hit == 6, "the second request takes the 24 shared tokens from the cache"
    want = greedy_through(tiny[0], policy_attention(tiny[0], tiny[1], cp), second, 16, chunk=24)
    assert got == want
    # and without the cache, fed the same chunks, the engine gives the same tokens
    cold = make_engine(tiny[0], tiny[1], cp, block_size=BS, num_kv_blocks=256, enable_prefix_caching=False,
                       max_num_batched_tokens=24)
    assert cold.generate([second], greedy(16))[0].new_token_ids == want


def test_a_hit_without_its_sinks_is_not_taken(tiny):
    cp = _q("int8", group_size=4, quant_sink_tokens=6)  # sinks span two blocks of 4
    shared = random_prompt(tiny[1].vocab_size, 5, seed=4)
    engine = make_engine(tiny[0], tiny[1], cp, block_size=BS, num_kv_blocks=256)
    _run(engine, "a", shared + [7, 7, 7, 7], 2)  # caches blocks 0-1; block 1 holds its sinks 4-5
    _, hit = _run(engine, "b", shared + [9, 9, 9, 9], 4)  # shares block 0 only: ends inside the sinks
    assert hit == 0
    kv = engine.runner.kv
    assert kv.usable_hit([123, 456]) == 0  # never stashed
