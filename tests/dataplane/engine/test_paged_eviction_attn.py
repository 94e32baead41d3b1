"""H2O and SnapKV in the paged engine (paged_scores.py + paged_eviction.py) against PolicyAttention.

The engine keeps one set per sequence (scores summed over layers and kv heads); the evaluator one
set per layer and kv head. They coincide on a 1-layer, 1-kv-head model, so generation is compared
token for token there; on the 2-layer, 2-kv-head model the engine's scores must equal the
evaluator's per-layer, per-head scores summed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from engine_testlib import greedy, greedy_through, make_engine, policy_attention, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig
from kvfleet.dataplane.engine.api import GenerationRequest
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.kvcache.eviction import protected_mask, select_keep, snapkv_scores
from kvfleet.dataplane.kvcache.policy import PolicyAttention
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama

BS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """2 layers, 4 query heads on 2 kv heads."""
    return load_model(str(write_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)), dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory):
    """1 layer, 4 query heads on 1 kv head: one set per sequence == one set per layer and head."""
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny1"), seed=1, num_hidden_layers=1, num_key_value_heads=1)
    return load_model(str(d), dtype=torch.float32)


def _cp(policy, budget=20, window=4, sinks=2, **kw) -> CachePolicyConfig:
    return CachePolicyConfig(eviction=policy, eviction_budget_tokens=budget, eviction_window_tokens=window,
                             eviction_sink_tokens=sinks, **kw)


def _engine(tiny, cp=None, **kw) -> LLMEngine:
    return make_engine(tiny[0], tiny[1], cp, block_size=BS, **kw)


def _prompt(tiny, n, seed=0):
    return random_prompt(tiny[1].vocab_size, n, seed, low=4)


def _evaluator(tiny, cp, slack=BS) -> PolicyAttention:
    return policy_attention(tiny[0], tiny[1], cp, slack)


def _feed(tiny, attn, tokens, start=0):
    model, _ = tiny
    with torch.inference_mode():
        return model.forward(torch.tensor(tokens), torch.arange(start, start + len(tokens)), attn)


def _policy_greedy(tiny, prompt, n, cp, chunk=None):
    """Greedy decoding through PolicyAttention (prompt fed in chunks of `chunk`, as the engine schedules it)."""
    return greedy_through(tiny[0], _evaluator(tiny, cp), prompt, n, chunk)


@pytest.mark.parametrize("policy,chunk", [("h2o", None), ("h2o", 12), ("snapkv", None), ("snapkv", 12)])
def test_generation_equals_policy_attention_on_one_layer_one_kv_head(tiny1, policy, chunk):
    cp = _cp(policy, budget=20, window=4, sinks=2, observation_window=8, pooling_kernel=3)
    prompt = _prompt(tiny1, 30, seed=7)
    # NOTE: snapkv waits for the whole prompt in the engine, so a chunked engine equals a one-forward evaluator
    want = _policy_greedy(tiny1, prompt, 40, cp, chunk if policy == "h2o" else None)
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    engine = _engine(tiny1, cp, **kw)
    got = engine.generate([prompt], greedy(40))[0].new_token_ids
    assert got == want and engine.eviction_stats().compactions >= 8
    # eviction and the policy really changed the output, else this proves little
    assert got != _engine(tiny1).generate([prompt], greedy(40))[0].new_token_ids
    assert got != _engine(tiny1, _cp("streaming-llm")).generate([prompt], greedy(40))[0].new_token_ids
    assert engine.scheduler.bm.num_used_blocks == 0 and not engine.evictor.scores.windows


def _first_choice(engine, rid):
    """Step until the first compaction of `rid`; -> (scores [n] of its slots before it, its token ids)."""
    ev, seen = engine.evictor, []
    orig = ev.choose

    def spy(seq):
        n = seq.num_kv_slots
        if seq.seq_id == rid and seq.num_evicted == 0:
            pos = torch.tensor(ev.slot_positions(seq))
            seen.append((ev.scores_of(seq, n, pos)[:, 0], list(seq.token_ids[:seq.num_computed_tokens])))
        return orig(seq)

    ev.choose = spy
    while not engine.seqs[rid].num_evicted:
        assert engine.seqs[rid].num_kv_slots == engine.seqs[rid].num_computed_tokens  # nothing evicted yet
        engine.step()
    return seen[-1]


def test_h2o_scores_are_the_evaluators_summed_over_layers_and_heads(tiny):
    cp = _cp("h2o", budget=20, window=4, sinks=2)
    engine = _engine(tiny, cp)
    prompt = _prompt(tiny, 14, seed=3)
    engine.add_request(GenerationRequest("a", prompt, greedy(30)))
    # scored once over budget: prompt prefill plus 7 decodes, each adding to every earlier token's score
    got, tokens = _first_choice(engine, "a")
    assert len(tokens) == 21
    attn = _evaluator(tiny, replace(cp, eviction_budget_tokens=1000))  # the evaluator, evicting nothing
    _feed(tiny, attn, tokens[:14])
    for i, t in enumerate(tokens[14:]):
        _feed(tiny, attn, [t], 14 + i)
    want = sum(attn.evict_state.acc[layer].sum(1) for layer in range(2))  # [21]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    prot = protected_mask(torch.arange(21)[:, None], 21, 2, 4)
    assert engine.seqs["a"].kept_positions == select_keep(want[:, None], prot, 20 - BS)[:, 0].tolist()
    while engine.has_unfinished():
        engine.step()
        assert all(s.num_kv_slots <= 20 for s in engine.scheduler.running)


def test_snapkv_evicts_once_at_the_end_of_a_chunked_prompt_by_the_last_prompt_queries(tiny):
    cp = _cp("snapkv", budget=20, window=4, sinks=2, observation_window=8, pooling_kernel=3)
    engine = _engine(tiny, cp, max_num_batched_tokens=12)  # prompt in chunks of 12, 12, 12, 1
    prompt = _prompt(tiny, 37, seed=5)
    engine.add_request(GenerationRequest("a", prompt, greedy(12)))
    _, tokens = _first_choice(engine, "a")
    assert tokens == prompt  # no eviction mid-prompt although 24 and 36 slots exceeded the budget
    attn = _evaluator(tiny, replace(cp, eviction_budget_tokens=1000))
    _feed(tiny, attn, prompt)  # one forward: its last 8 queries are the observation window
    st = attn.evict_state
    q_win, q_pos = engine.evictor.scores.windows["a"]
    assert q_pos.tolist() == st.q_pos[0].tolist() == list(range(29, 37))
    pos = torch.arange(37)[:, None].expand(37, 2)
    want = 0
    for layer in range(2):
        torch.testing.assert_close(q_win[layer], st.q_win[layer], rtol=1e-5, atol=1e-5)
        keys = attn.layers[layer].materialize()[0]
        want = want + snapkv_scores(st.q_win[layer], st.q_pos[layer], keys, pos, 3).sum(1)  # [37]
    prot = protected_mask(torch.arange(37)[:, None], 37, 2, 4)
    kept = select_keep(want[:, None], prot, 20 - BS)[:, 0].tolist()
    assert engine.seqs["a"].kept_positions == kept != list(range(2)) + list(range(23, 37))
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.bm.num_used_blocks == 0 and not engine.evictor.scores.windows


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_budget_holds_and_no_block_leaks(tiny, policy):
    engine = _engine(tiny, _cp(policy, budget=16, window=4, sinks=2, observation_window=4),
                     max_num_batched_tokens=16)
    bm = engine.scheduler.bm
    free0 = bm.num_free_blocks
    for i, n in enumerate([5, 30, 17, 50]):
        engine.add_request(GenerationRequest(f"r{i}", _prompt(tiny, n, seed=i), greedy(40)))
    while engine.has_unfinished():
        engine.step()
        bm.check_invariants()
        for seq in engine.scheduler.running:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:  # snapkv may exceed it mid-prompt only
                assert seq.num_kv_slots <= 16
        if engine.generation_tokens > 30 and "r2" in engine.seqs:
            engine.abort("r2")
    st = engine.eviction_stats()
    assert st.blocks_freed > 10 and st.tokens_evicted > 100
    assert bm.num_free_blocks == free0 and bm.num_used_blocks == 0 and all(rc == 0 for rc in bm.ref_counts)
    assert not engine.evictor.scores.windows


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_shared_prefix_blocks_are_never_written(tiny, policy):
    cp = _cp(policy, budget=24, window=8, sinks=4, observation_window=4)
    shared = _prompt(tiny, 8, seed=11)  # two full blocks
    a, b = shared + _prompt(tiny, 6, seed=12), shared + _prompt(tiny, 3, seed=13)  # b: 11 + 10 <= 24
    alone = _engine(tiny, cp).generate([b], greedy(10))[0].new_token_ids
    engine = _engine(tiny, cp)
    engine.add_request(GenerationRequest("a", a, greedy(40)))
    engine.step()  # a's prompt computed, its full blocks published
    engine.add_request(GenerationRequest("b", b, greedy(10)))
    got = [t for o in engine.step() if o.request_id == "b" for t in o.new_token_ids]
    blocks = torch.tensor(engine.seqs["b"].block_table[:2])
    assert engine.seqs["b"].num_hit_blocks == 2 and engine.seqs["a"].block_table[:2] == blocks.tolist()
    kv = engine.runner.kv
    snap = [t[blocks].clone() for t in kv.k + kv.v]
    while engine.has_unfinished():
        got += [t for o in engine.step() if o.request_id == "b" for t in o.new_token_ids]
        if "a" in engine.seqs and "b" in engine.seqs:  # shared (refcount 2): a compacts around them
            assert engine.seqs["a"].block_table[:2] == blocks.tolist()
            for t, s in zip(kv.k + kv.v, snap, strict=True):
                assert torch.equal(t[blocks], s)
    assert got == alone and engine.eviction_stats().compactions >= 5
    assert engine.scheduler.bm.num_used_blocks == 0
