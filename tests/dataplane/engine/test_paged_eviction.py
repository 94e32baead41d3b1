"""Token eviction in the paged engine (kvcache/paged_eviction.py): kept sets, budgets, blocks, positions."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import greedy, greedy_through, make_engine, policy_attention, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig
from kvfleet.dataplane.engine.api import GenerationRequest
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.kvcache.eviction import (
    keydiff_scores,
    protected_mask,
    select_keep,
    streaming_scores,
)

BS = 4


def _policy(policy="streaming-llm", budget=24, window=8, sinks=4, **kw) -> CachePolicyConfig:
    return CachePolicyConfig(eviction=policy, eviction_budget_tokens=budget, eviction_window_tokens=window,
                             eviction_sink_tokens=sinks, **kw)


def _engine(tiny, cp: CachePolicyConfig | None = None, **kw) -> LLMEngine:
    return make_engine(tiny[0], tiny[1], cp, block_size=BS, **kw)


def _prompt(tiny, n, seed=0):
    return random_prompt(tiny[1].vocab_size, n, seed)


def _check(engine: LLMEngine, budget: int | None) -> None:
    """Invariants after any step: refcounts, budget, table size."""
    bm = engine.scheduler.bm
    bm.check_invariants()
    for seq in engine.scheduler.running:
        if budget is not None and seq.num_evicted:
            assert seq.num_kv_slots <= budget
        assert len(seq.block_table) * BS >= seq.num_kv_slots


def _run(engine: LLMEngine, budget: int | None = None, every=None) -> None:
    while engine.has_unfinished():
        engine.step()
        _check(engine, budget)
        if every:
            every(engine)


@pytest.mark.parametrize("cp", [_policy(pyramid=True), _policy("h2o", pyramid=True)])
def test_rejects_what_the_paged_engine_cannot_apply(tiny, cp):
    with pytest.raises(ValueError, match="cache_policy.pyramid"):
        _engine(tiny, cp)


def test_streaming_keeps_sinks_and_window(tiny):
    engine = _engine(tiny, _policy(budget=24, window=8, sinks=4))
    assert engine.evictor.spec.slack_tokens == BS  # hysteresis: over 24 -> keep 20
    engine.add_request(GenerationRequest("a", _prompt(tiny, 40), greedy(30)))
    sizes = []
    for _ in range(10):
        engine.step()
        seq = engine.seqs["a"]
        seen, n = seq.num_computed_tokens, seq.num_kv_slots
        sizes.append(n)
        pos = torch.arange(seen)[:, None]
        want = select_keep(streaming_scores(pos), protected_mask(pos, seen, 4, 8), n)[:, 0].tolist()
        assert engine.evictor.slot_positions(seq) == want == list(range(4)) + list(range(seen - n + 4, seen))
    assert sizes == [20, 21, 22, 23, 24, 20, 21, 22, 23, 24]  # one compaction per block of new tokens
    _run(engine, 24)
    assert engine.scheduler.bm.num_used_blocks == 0


def test_keydiff_keeps_the_selection_of_eviction_py(tiny):
    engine = _engine(tiny, _policy("keydiff", budget=20, window=4, sinks=2))
    ev = engine.evictor
    seen_keys = []
    orig = ev.choose

    def spy(seq):
        seen_keys.append((ev.keys(seq, seq.num_kv_slots), ev.slot_positions(seq), seq.num_computed_tokens))
        return orig(seq)

    ev.choose = spy
    engine.add_request(GenerationRequest("a", _prompt(tiny, 37, seed=3), greedy(3)))
    engine.step()  # the whole prompt in one prefill, then one compaction
    keys, pos, seen = seen_keys[0]
    scores = sum(keydiff_scores(k).sum(1) for k in keys)[:, None]  # [N, 1] over layers and kv heads
    prot = protected_mask(torch.tensor(pos)[:, None], seen, 2, 4)
    want = select_keep(scores, prot, 20 - BS)[:, 0].tolist()  # over budget: keep budget - slack
    seq = engine.seqs["a"]
    assert seq.kept_positions == want and len(want) == 16 and want != list(range(2)) + list(range(23, 37))
    after = ev.keys(seq, seq.num_kv_slots)  # the kept keys really sit at the front now
    for layer, k in enumerate(after):
        torch.testing.assert_close(k, keys[layer][want], rtol=0, atol=0)
    _run(engine, 20)


def test_budget_holds_blocks_freed_no_leaks(tiny):
    engine = _engine(tiny, _policy(budget=16, window=8, sinks=4), max_num_batched_tokens=16)
    bm = engine.scheduler.bm
    for i, n in enumerate([5, 30, 17, 50]):
        engine.add_request(GenerationRequest(f"r{i}", _prompt(tiny, n, seed=i), greedy(40)))
    _run(engine, 16, every=lambda e: e.abort("r2") if e.generation_tokens > 30 and "r2" in e.seqs else None)
    st = engine.eviction_stats()
    assert st.blocks_freed > 10 and st.tokens_evicted > 100
    assert bm.num_used_blocks == 0 and all(rc == 0 for rc in bm.ref_counts)
    bm.check_invariants()


def test_ratio_budget(tiny):
    cp = CachePolicyConfig(eviction="streaming-llm", eviction_budget_ratio=0.5, eviction_window_tokens=4,
                           eviction_sink_tokens=2)
    engine = _engine(tiny, cp)
    engine.add_request(GenerationRequest("a", _prompt(tiny, 40), greedy(20)))
    engine.step()
    assert engine.seqs["a"].num_kv_slots == 20 - BS  # ceil(0.5 * 40) - slack
    _run(engine)
    assert engine.scheduler.bm.num_used_blocks == 0


@pytest.mark.parametrize("prefix", [True, False])
def test_budget_above_sequence_equals_no_eviction(tiny, prefix):
    prompts = [_prompt(tiny, n, seed=n) for n in (9, 23, 31)]
    base = _engine(tiny, enable_prefix_caching=prefix).generate(prompts, greedy(16))
    ev = _engine(tiny, _policy(budget=200), enable_prefix_caching=prefix)
    got = ev.generate(prompts, greedy(16))
    assert [o.new_token_ids for o in got] == [o.new_token_ids for o in base]
    assert ev.eviction_stats().compactions == 0


def _policy_greedy(tiny, prompt, n, cp, slack=BS):
    """PolicyAttention told the engine's hysteresis (evict to budget - slack), so both must agree."""
    return greedy_through(tiny[0], policy_attention(tiny[0], tiny[1], cp, slack), prompt, n)


@pytest.mark.parametrize("prefix", [True, False])
def test_streaming_equals_policy_attention(tiny, prefix):
    cp = _policy(budget=20, window=8, sinks=4)
    prompt = _prompt(tiny, 30, seed=7)
    want = _policy_greedy(tiny, prompt, 40, cp)
    engine = _engine(tiny, cp, enable_prefix_caching=prefix)
    got = engine.generate([prompt], greedy(40))[0].new_token_ids
    assert got == want and engine.eviction_stats().compactions == 8  # prefill, then every 5 tokens
    assert want != _policy_greedy(tiny, prompt, 40, cp, slack=0)  # the slack matters: both apply it
    # and eviction really changed the output (else this proves nothing about positions)
    assert got != _engine(tiny).generate([prompt], greedy(40))[0].new_token_ids


def test_shared_prefix_block_survives_an_evicting_neighbour(tiny):
    cp = _policy(budget=24, window=8, sinks=4)
    shared = _prompt(tiny, 8, seed=11)  # two full blocks
    a = shared + _prompt(tiny, 6, seed=12)  # under budget at first: its full blocks get published
    b = shared + _prompt(tiny, 3, seed=13)  # 11 + 10 tokens: never over budget itself
    alone = _engine(tiny, cp).generate([b], greedy(10))[0].new_token_ids
    engine = _engine(tiny, cp)
    engine.add_request(GenerationRequest("a", a, greedy(40)))
    engine.step()  # a's prompt: computed and its full blocks published
    engine.add_request(GenerationRequest("b", b, greedy(10)))
    # b takes the two shared blocks (refcount 2): a must compact around them
    got = [t for o in engine.step() if o.request_id == "b" for t in o.new_token_ids]
    assert engine.seqs["b"].num_hit_blocks == 2
    while engine.has_unfinished():
        a_seq = engine.seqs.get("a")
        got += [t for o in engine.step() if o.request_id == "b" for t in o.new_token_ids]
        _check(engine, 24)
        if a_seq is not None and "b" in engine.seqs:
            assert a_seq.block_table[:2] == engine.seqs["b"].block_table[:2]
    assert got == alone
    assert engine.stats().prefix_cache_hit_tokens >= 8
    assert engine.eviction_stats().compactions >= 5  # one per block of new tokens (hysteresis)
    assert engine.scheduler.bm.num_used_blocks == 0


def test_preempted_evicted_sequence_recomputes_from_all_tokens(tiny):
    cp = _policy(budget=16, window=8, sinks=4)
    prompts = [_prompt(tiny, 20, seed=s) for s in range(4)]
    want = [_engine(tiny, cp).generate([p], greedy(24))[0].new_token_ids for p in prompts]
    # 12 blocks of 4 slots: four sequences of up to 16 kept slots cannot all run at once
    engine = _engine(tiny, cp, num_kv_blocks=12, max_num_batched_tokens=24)
    got = engine.generate(prompts, greedy(24))
    assert engine.stats().num_preemptions > 0
    # NOTE: an evicted sequence recomputes from its full token list, so after a preemption its kept
    # set is the prefill's choice, not the incremental one: only the engine's accounting must hold.
    assert all(len(o.new_token_ids) == 24 for o in got)
    assert got[0].new_token_ids[:1] == want[0][:1]
    engine.scheduler.bm.check_invariants()
    assert engine.scheduler.bm.num_used_blocks == 0


def test_eviction_with_quantized_kv(tiny):
    cp = _policy(budget=20, window=8, sinks=4, key_quantization="int8", value_quantization="int8",
                 group_size=BS)
    engine = _engine(tiny, cp)
    out = engine.generate([_prompt(tiny, 30)], greedy(30))[0]
    assert len(out.new_token_ids) == 30 and engine.eviction_stats().blocks_freed > 0
    assert engine.scheduler.bm.num_used_blocks == 0


@pytest.mark.parametrize("policy", ["streaming-llm", "keydiff", "h2o", "snapkv"])
def test_batched_prefill_path_equals_loop_path_under_eviction(tiny, policy):
    """Chunked prefill after compaction: both prefill attention paths see the same physical context."""
    prompts = [_prompt(tiny, n, seed=n) for n in (27, 41, 33)]
    outs = []
    for batched in (False, True):
        engine = _engine(tiny, _policy(policy, budget=20, window=8, sinks=4), max_num_batched_tokens=12)
        engine.runner.batch_prefill = batched
        outs.append([o.new_token_ids for o in engine.generate(prompts, greedy(20))])
        assert engine.eviction_stats().compactions > 0 and engine.scheduler.bm.num_used_blocks == 0
    assert outs[0] == outs[1]
