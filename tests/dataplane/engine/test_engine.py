"""LLMEngine on a tiny model: paged greedy == dense greedy in every scheduling regime."""

from __future__ import annotations

import random

import pytest
from engine_testlib import dense_greedy
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(tiny, batch_prefill: bool = False, **kw) -> LLMEngine:
    model, mc, _ = tiny
    cfg = EngineConfig(model_dir="unused", **{"block_size": 4, "num_kv_blocks": 256, **kw})
    engine = LLMEngine(model, mc, cfg)
    engine.runner.batch_prefill = batch_prefill  # both attention paths for prefill chunks
    return engine


BOTH_PREFILL_PATHS = pytest.mark.parametrize("batch_prefill", [False, True], ids=["loop", "batched"])


def _prompts(vocab: int, lengths, seed=0, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(1, vocab) for _ in range(n)] for n in lengths]


def _check_no_leaks(engine: LLMEngine):
    bm = engine.scheduler.bm
    bm.check_invariants()
    assert not engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="module")
def reference(tiny):
    model, mc, _ = tiny
    cache: dict[tuple[int, ...], list[int]] = {}

    def ref(prompt):
        key = tuple(prompt)
        if key not in cache:
            cache[key] = dense_greedy(model, prompt, GREEDY.max_tokens)
        return cache[key]

    return ref


@BOTH_PREFILL_PATHS
def test_one_batch_mixed_lengths_matches_dense(tiny, reference, batch_prefill):
    engine = _engine(tiny, batch_prefill)
    prompts = _prompts(tiny[1].vocab_size, [1, 3, 4, 5, 9, 17, 30])
    outs = engine.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs, strict=True):
        assert o.new_token_ids == reference(p), f"prompt len {len(p)}"
        assert o.finished and o.finish_reason == "length"
    _check_no_leaks(engine)


@BOTH_PREFILL_PATHS
def test_prefix_cache_hits_match_dense(tiny, reference, batch_prefill):
    engine = _engine(tiny, batch_prefill)
    shared = _prompts(tiny[1].vocab_size, [13], seed=1)[0]
    first = _prompts(tiny[1].vocab_size, [2, 5], seed=2, prefix=shared)
    second = _prompts(tiny[1].vocab_size, [1, 7, 0], seed=3, prefix=shared)
    engine.generate(first, GREEDY)
    outs = engine.generate(second, GREEDY)
    for p, o in zip(second, outs, strict=True):
        assert o.new_token_ids == reference(p)
        assert o.num_cached_prompt_tokens >= 12 - (4 if len(p) == 13 else 0)
    assert engine.stats().prefix_cache_hit_tokens > 0
    _check_no_leaks(engine)


@BOTH_PREFILL_PATHS
def test_preemption_matches_dense(tiny, reference, batch_prefill):
    # 12 blocks x 4 slots = 48 slots for 4 sequences needing up to 32 each: preemption is forced
    engine = _engine(tiny, batch_prefill, num_kv_blocks=12)
    prompts = _prompts(tiny[1].vocab_size, [6, 11, 15, 20], seed=4)
    outs = engine.generate(prompts, GREEDY)
    assert engine.stats().num_preemptions > 0
    # each request's final output says how often it was preempted (the request span's kvfleet.preemptions)
    assert sum(o.num_preemptions for o in outs) == engine.stats().num_preemptions
    assert all(o.queue_s is not None and o.queue_s >= 0 for o in outs)  # the span's kvfleet.engine_queue_ms
    for p, o in zip(prompts, outs, strict=True):
        assert o.new_token_ids == reference(p)
    _check_no_leaks(engine)


def test_preemption_without_prefix_cache(tiny, reference):
    engine = _engine(tiny, num_kv_blocks=12, enable_prefix_caching=False)
    prompts = _prompts(tiny[1].vocab_size, [6, 11, 15, 20], seed=4)
    outs = engine.generate(prompts, GREEDY)
    assert engine.stats().num_preemptions > 0 and engine.stats().prefix_cache_hit_tokens == 0
    for p, o in zip(prompts, outs, strict=True):
        assert o.new_token_ids == reference(p)
    _check_no_leaks(engine)


@BOTH_PREFILL_PATHS
def test_chunked_prefill_matches_dense(tiny, reference, batch_prefill):
    engine = _engine(tiny, batch_prefill, max_num_batched_tokens=5)
    prompts = _prompts(tiny[1].vocab_size, [3, 12, 23], seed=5)
    outs = engine.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs, strict=True):
        assert o.new_token_ids == reference(p)
    _check_no_leaks(engine)


def test_seeded_sampling_is_reproducible_regardless_of_batch(tiny):
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = _prompts(tiny[1].vocab_size, [7], seed=6)[0]
    alone = _engine(tiny).generate([prompt], sp)[0].new_token_ids
    others = _prompts(tiny[1].vocab_size, [3, 9, 14], seed=7)
    mixed = _engine(tiny).generate([others[0], prompt, others[1], others[2]],
                                   [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True), sp,
                                    GREEDY, SamplingParams(max_tokens=4, temperature=0.5, seed=9)])
    assert mixed[1].new_token_ids == alone
    other_seed = _engine(tiny).generate([prompt], SamplingParams(**{**sp.__dict__, "seed": 99}))[0]
    assert other_seed.new_token_ids != alone


def test_logprobs_and_stop_tokens(tiny, reference):
    engine = _engine(tiny)
    prompt = _prompts(tiny[1].vocab_size, [8], seed=8)[0]
    ref = reference(prompt)
    sp = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
    out = engine.generate([prompt], sp)[0]
    assert out.new_token_ids == ref and len(out.logprobs) == 12
    for tok, lp in zip(out.new_token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok and abs(lp.top[0][1] - lp.logprob) < 1e-5  # greedy = best
    stop_at = ref[4]
    first = ref.index(stop_at)
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_at,),
                                                   ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.new_token_ids == ref[:first + 1]  # stop token included
    _check_no_leaks(engine)


def test_abort_frees_blocks(tiny):
    engine = _engine(tiny)
    prompts = _prompts(tiny[1].vocab_size, [9, 14], seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0.0)))
    engine.step()
    engine.step()
    assert engine.scheduler.bm.num_used_blocks > 0
    final = engine.abort("r0")
    assert final.finished and final.finish_reason == "abort"
    assert engine.abort("nope") is None
    assert engine.abort("r1").finish_reason == "abort"
    _check_no_leaks(engine)


def test_rejects_impossible_requests(tiny):
    engine = _engine(tiny, num_kv_blocks=4)  # 16 slots
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(GenerationRequest("big", list(range(1, 17))))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(GenerationRequest("zero", [1], SamplingParams(max_tokens=0)))
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request(GenerationRequest("oov", [1, tiny[1].vocab_size]))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request(GenerationRequest("empty", []))
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.new_token_ids) == 16 - 3


def test_runner_batches_decodes_with_one_forward(tiny, monkeypatch):
    engine = _engine(tiny)
    calls = []
    real = engine.runner.model.forward

    def spy(ids, pos, attn):
        calls.append((ids.shape[0], attn.meta.num_decodes, len(attn.meta.prefills)))
        return real(ids, pos, attn)

    monkeypatch.setattr(engine.runner.model, "forward", spy)
    engine.generate(_prompts(tiny[1].vocab_size, [5, 6, 7], seed=10), SamplingParams(max_tokens=3, temperature=0))
    assert calls[0] == (18, 0, 3) and calls[1] == (3, 3, 0)


def test_variant_isolates_prefix_cache(tiny):
    engine = _engine(tiny)
    prompt = _prompts(tiny[1].vocab_size, [17], seed=11)[0]
    engine.generate([prompt], GREEDY, variant="base")
    other = engine.generate([prompt], GREEDY, variant="finetune")[0]
    same = engine.generate([prompt], GREEDY, variant="base")[0]
    assert other.num_cached_prompt_tokens == 0 and same.num_cached_prompt_tokens == 16


def test_slo_class_sets_priority_and_deadlines(tiny):
    from kvfleet.dataplane.config import SLOClassConfig

    engine = _engine(tiny, slo_classes=(SLOClassConfig("chat", 200, 20, priority=3),), default_slo_class="chat")
    engine.add_request(GenerationRequest("a", [1, 2, 3], GREEDY, slo_class="chat"))
    engine.add_request(GenerationRequest("b", [1, 2, 3], GREEDY, slo_class="unknown"))  # -> default class
    for rid in ("a", "b"):
        seq = engine.seqs[rid]
        assert seq.priority == 3 and seq.ttft_s == 0.2 and seq.tpot_s == 0.02
    best_effort = _engine(tiny)
    best_effort.add_request(GenerationRequest("c", [1, 2, 3], GREEDY, slo_class="chat"))
    assert best_effort.seqs["c"].ttft_s == float("inf")


def test_from_config_sizes_kv_from_bytes(tiny):
    model_dir = tiny[2]
    mc = tiny[1]
    per_block = 2 * mc.num_hidden_layers * 4 * mc.num_key_value_heads * mc.head_dim * 4  # fp32, block_size 4
    cfg = EngineConfig(model_dir=model_dir, device="cpu", dtype="float32", block_size=4,
                       kv_cache_bytes=per_block * 40 + 7)
    engine = LLMEngine.from_config(cfg)
    assert engine.scheduler.bm.num_blocks == 40 and engine.max_model_len == 160
    prompt = _prompts(mc.vocab_size, [9], seed=12)[0]
    assert engine.generate([prompt], GREEDY)[0].new_token_ids == dense_greedy(tiny[0], prompt, 12)


def test_priority_preemption_matches_dense(tiny, reference):
    from kvfleet.dataplane.config import SLOClassConfig

    classes = (SLOClassConfig("batch", 60_000, 1_000, priority=0), SLOClassConfig("chat", 500, 50, priority=5))
    engine = _engine(tiny, num_kv_blocks=14, slo_classes=classes)
    lo = _prompts(tiny[1].vocab_size, [15, 18], seed=13)
    hi = _prompts(tiny[1].vocab_size, [9, 12], seed=14)
    for i, p in enumerate(lo):
        engine.add_request(GenerationRequest(f"lo{i}", p, GREEDY, slo_class="batch"))
    toks: dict[str, list[int]] = {}
    for _ in range(2):
        for o in engine.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
    for i, p in enumerate(hi):
        engine.add_request(GenerationRequest(f"hi{i}", p, GREEDY, slo_class="chat"))
    finished_order = []
    while engine.has_unfinished():
        for o in engine.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished_order.append(o.request_id)
    assert engine.stats().num_preemptions > 0
    assert set(finished_order[:2]) == {"hi0", "hi1"}  # chat overtook the batch work
    for i, p in enumerate(lo):
        assert toks[f"lo{i}"] == reference(p)
    for i, p in enumerate(hi):
        assert toks[f"hi{i}"] == reference(p)
    _check_no_leaks(engine)
