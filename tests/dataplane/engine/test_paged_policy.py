"""The paged engine applies every quantization field of a CachePolicy as `PolicyAttention` does.

Full-precision sinks and residual tail (lanes), per-channel key scales grouped over tokens (groups
inside a block and groups spanning blocks), pre-RoPE keys, and each decode's own token read at full
precision: greedy generation through the engine equals `PolicyAttention` token for token.
"""

from __future__ import annotations

import pytest
from engine_testlib import greedy, greedy_through, make_engine, policy_attention, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig, ConfigError, EngineConfig
from kvfleet.dataplane.engine.api import GenerationRequest
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.kvcache.paged_quant import PagedQuantKV

BS = 4


def _q(dtype: str = "int8", **kw) -> CachePolicyConfig:
    return CachePolicyConfig(key_quantization=dtype, value_quantization=dtype, **kw)


CASES = {
    "int8-kivi-group-in-block": _q("int8", key_granularity="per-channel", group_size=2, residual_tokens=3,
                                   quant_sink_tokens=2),
    "int4-kivi-group-spans-blocks": _q("int4", key_granularity="per-channel", group_size=8, residual_tokens=5,
                                       quant_sink_tokens=8),
    "int4-per-token-pre-rope": _q("int4", key_granularity="per-token", group_size=8, residual_tokens=4,
                                  quant_sink_tokens=1, keys_pre_rope=True),
    "int8-kivi-pre-rope-no-residual": _q("int8", group_size=4, keys_pre_rope=True),
    "fp8-per-head": _q("fp8", group_size=4, residual_tokens=2),
    "int2-kivi": _q("int2", key_granularity="per-channel", group_size=4, residual_tokens=4, quant_sink_tokens=2),
    "int3-kivi-pre-rope": _q("int3", group_size=8, residual_tokens=3, quant_sink_tokens=1, keys_pre_rope=True),
    "int4-evicting": _q("int4", group_size=8, residual_tokens=4, quant_sink_tokens=2, eviction="streaming-llm",
                        eviction_budget_tokens=20, eviction_window_tokens=8, eviction_sink_tokens=4),
}


def _engine(tiny, cp: CachePolicyConfig, **kw) -> LLMEngine:
    return make_engine(tiny[0], tiny[1], cp, **{"block_size": BS, "num_kv_blocks": 256, **kw})


def _prompt(tiny, n: int, seed: int) -> list[int]:
    return random_prompt(tiny[1].vocab_size, n, seed)


def _reference(tiny, prompt: list[int], n: int, cp: CachePolicyConfig, chunk: int | None = None) -> list[int]:
    """PolicyAttention (told the engine's one-block eviction slack), prompt fed in pieces of `chunk`."""
    return greedy_through(tiny[0], policy_attention(tiny[0], tiny[1], cp, slack=BS), prompt, n, chunk)


@pytest.mark.parametrize("name", list(CASES))
def test_engine_equals_policy_attention(tiny, name):
    cp = CASES[name]
    prompts = [_prompt(tiny, n, seed=n) for n in (13, 26, 7)]
    engine = _engine(tiny, cp)
    assert isinstance(engine.runner.kv, PagedQuantKV)
    got = [o.new_token_ids for o in engine.generate(prompts, greedy(24))]  # three sequences, three lanes
    want = [_reference(tiny, p, 24, cp) for p in prompts]
    if engine.evictor is not None:
        assert engine.evictor.spec.slack_tokens == BS and engine.eviction_stats().compactions > 0
    assert got == want
    assert engine.scheduler.bm.num_used_blocks == 0 and not engine.runner.lanes.held


@pytest.mark.parametrize("name", ["int4-kivi-group-spans-blocks", "int4-per-token-pre-rope",
                                  "int8-kivi-pre-rope-no-residual", "int4-evicting"])
def test_chunked_prefill_equals_policy_attention_fed_the_same_chunks(tiny, name):
    """Later chunks read earlier ones from the cache: stored rows, lane rows, pre-RoPE keys re-rotated."""
    cp = CASES[name]
    prompt = _prompt(tiny, 27, seed=5)
    engine = _engine(tiny, cp, max_num_batched_tokens=6)
    got = engine.generate([prompt], greedy(20))[0].new_token_ids
    assert got == _reference(tiny, prompt, 20, cp, chunk=6)


def test_full_precision_rows_change_what_is_read(tiny):
    """The lanes are not decoration: dropping sinks/residual changes the int4 reference and the engine alike."""
    base = _q("int4", key_granularity="per-channel", group_size=8)
    rich = CASES["int4-kivi-group-spans-blocks"]
    prompts = [_prompt(tiny, n, seed=n) for n in (13, 26, 7)]
    plain = [_reference(tiny, p, 24, base) for p in prompts]
    with_lanes = [_reference(tiny, p, 24, rich) for p in prompts]
    assert plain != with_lanes
    assert [o.new_token_ids for o in _engine(tiny, base).generate(prompts, greedy(24))] == plain


def test_lanes_are_reused_after_sequences_finish(tiny):
    cp = CASES["int4-per-token-pre-rope"]
    engine = _engine(tiny, cp, max_num_seqs=2)
    assert engine.runner.kv.lanes is not None and engine.runner.kv.lanes.num_lanes == 2
    prompts = [_prompt(tiny, 9 + i, seed=i) for i in range(5)]  # five sequences through two lanes
    got = [o.new_token_ids for o in engine.generate(prompts, greedy(12))]
    assert got == [_reference(tiny, p, 12, cp) for p in prompts]


def test_prefix_hits_never_split_a_group_that_spans_blocks(tiny):
    cp = _q("int8", key_granularity="per-channel", group_size=8)  # a group = 2 blocks of 4
    engine = _engine(tiny, cp)
    shared = _prompt(tiny, 14, seed=3)  # 3 full blocks: the third block's group is not complete
    engine.generate([shared + [5]], greedy(2))
    engine.add_request(GenerationRequest("b", shared + [9, 9], greedy(2)))
    engine.step()
    seq = engine.seqs["b"]
    assert seq.num_cached_prompt_tokens == 8 and seq.num_hit_blocks == 2  # 3 blocks matched, 2 taken
    while engine.has_unfinished():
        engine.step()
    engine.scheduler.bm.check_invariants()


def test_kv_budget_pays_for_the_lanes(tiny):
    plain = _engine(tiny, _q("int8", group_size=4), num_kv_blocks=None, kv_cache_bytes=1 << 20, max_num_seqs=4)
    lanes = _engine(tiny, _q("int8", group_size=4, residual_tokens=32, quant_sink_tokens=4), num_kv_blocks=None,
                    kv_cache_bytes=1 << 20, max_num_seqs=4)
    assert lanes.runner.kv.nbytes() <= 1 << 20 and plain.runner.kv.nbytes() <= 1 << 20
    assert lanes.stats().kv_blocks_total < plain.stats().kv_blocks_total


@pytest.mark.parametrize("cp,match", [
    (_q("int8", key_granularity="per-channel", eviction="keydiff", eviction_budget_tokens=40), "key_granularity"),
    (_q("fp8", value_granularity="per-head", eviction="keydiff", eviction_budget_tokens=40), "value_granularity"),
    (_q("int8", residual_tokens=40, eviction="keydiff", eviction_budget_tokens=80), "residual_tokens"),
    (_q("int8", quant_sink_tokens=8, eviction="keydiff", eviction_budget_tokens=80), "quant_sink_tokens"),
])
def test_combinations_the_paged_engine_cannot_apply_are_refused(tiny, cp, match):
    with pytest.raises(ConfigError, match=match):
        cp.check_servable()
    with pytest.raises(ValueError, match=match):
        _engine(tiny, cp)


def test_group_size_must_fit_the_block_size():
    with pytest.raises(ConfigError, match="group_size 12 and block_size 16"):
        EngineConfig(model_dir="m", block_size=16, cache_policy=_q("int8", group_size=12))
    EngineConfig(model_dir="m", block_size=16, cache_policy=_q("int8", key_granularity="per-token", group_size=8))


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "keydiff"])
def test_attention_scored_eviction_over_quantized_lanes(tiny, policy):
    """Scores come from what attention reads (stored rows + lane rows); compaction moves the per-slot codes."""
    cp = _q("int4", group_size=8, residual_tokens=4, quant_sink_tokens=2, keys_pre_rope=True, eviction=policy,
            eviction_budget_tokens=20, eviction_window_tokens=8, eviction_sink_tokens=4)
    engine = _engine(tiny, cp)  # whole prompts in one step (chunk boundaries change what quantized KV reads)
    prompts = [_prompt(tiny, n, seed=n) for n in (13, 26, 7)]
    outs = engine.generate(prompts, greedy(30))
    assert [len(o.new_token_ids) for o in outs] == [30, 30, 30]
    assert engine.eviction_stats().compactions > 0
    assert engine.scheduler.bm.num_used_blocks == 0 and not engine.runner.lanes.held
    # the same requests one at a time: lanes and scores are per sequence, so batching changes nothing
    alone = [_engine(tiny, cp).generate([p], greedy(30))[0].new_token_ids
             for p in prompts]
    assert [o.new_token_ids for o in outs] == alone


@pytest.mark.parametrize("prefix", [True, False])
def test_preempted_sequences_give_their_lanes_back(tiny, prefix):
    """12 blocks of 4 slots for 4 sequences of up to 44 tokens: preemption by recompute is forced; a
    preempted sequence's lane may go to another one and it recomputes its full-precision rows."""
    cp = CASES["int4-per-token-pre-rope"]
    engine = _engine(tiny, cp, num_kv_blocks=12, max_num_seqs=4, enable_prefix_caching=prefix)
    prompts = [_prompt(tiny, n, seed=n) for n in (6, 11, 15, 20)]
    outs = engine.generate(prompts, greedy(24))
    assert engine.stats().num_preemptions > 0
    assert [len(o.new_token_ids) for o in outs] == [24] * 4
    assert engine.scheduler.bm.num_used_blocks == 0 and not engine.runner.lanes.held
    assert sorted(engine.runner.lanes.free) == [0, 1, 2, 3]
