"""n > 1: one prefill, the prompt's blocks shared by the choices (last block copied on write), each
choice sampling with seed + i exactly as a lone request with that seed would."""

from __future__ import annotations

from collections import defaultdict

from engine_testlib import make_engine, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig
from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams


def _run(eng, rid, prompt, sp):
    eng.add_request(GenerationRequest(rid, prompt, sp))
    toks: dict[int, list[int]] = defaultdict(list)
    reasons: dict[int, str] = {}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == rid
            toks[o.index] += o.new_token_ids
            if o.finished:
                reasons[o.index] = o.finish_reason
    return [toks[i] for i in range(sp.n)], reasons


def test_n_choices_share_one_prefill_and_equal_lone_seeded_requests(tiny):
    model, mc, _ = tiny
    prompt = random_prompt(mc.vocab_size, 10, seed=5)  # block_size 4: the last block is partly filled
    sp = SamplingParams(max_tokens=9, temperature=1.0, seed=11, ignore_eos=True, n=4)
    eng = make_engine(model, mc, enable_prefix_caching=False)
    choices, reasons = _run(eng, "r", prompt, sp)
    assert eng.stats().prompt_tokens_computed == len(prompt)  # one prefill for four choices
    assert reasons == {i: "length" for i in range(4)} and all(len(c) == 9 for c in choices)
    assert len({tuple(c) for c in choices}) > 1  # different seeds, different samples
    assert eng.stats().generation_tokens == 36 and eng.stats().prompt_tokens == len(prompt)
    eng.scheduler.bm.check_invariants()
    assert eng.scheduler.bm.num_used_blocks == 0 and not eng.seqs and not eng.groups
    again, _ = _run(eng, "r2", prompt, sp)
    assert again == choices  # reproducible
    for i in range(4):
        lone = eng.generate([prompt], SamplingParams(max_tokens=9, temperature=1.0, seed=11 + i, ignore_eos=True))
        assert lone[0].new_token_ids == choices[i], i


def test_n_choices_with_a_full_last_block_and_greedy(tiny):
    model, mc, _ = tiny
    prompt = random_prompt(mc.vocab_size, 8, seed=6)  # exactly two blocks: nothing to copy
    eng = make_engine(model, mc)
    choices, _ = _run(eng, "g", prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, n=3))
    lone = eng.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert choices == [lone.new_token_ids] * 3


def test_abort_of_a_group_ends_every_choice_and_frees_blocks(tiny):
    model, mc, _ = tiny
    prompt = random_prompt(mc.vocab_size, 10, seed=7)
    eng = make_engine(model, mc)
    eng.add_request(GenerationRequest("a", prompt, SamplingParams(max_tokens=50, ignore_eos=True, n=3, seed=1)))
    eng.step()
    eng.step()
    outs = eng.abort_all("a")
    assert sorted(o.index for o in outs) == [0, 1, 2] and all(o.finish_reason == "abort" for o in outs)
    assert not eng.has_unfinished() and not eng.seqs and not eng.groups
    eng.scheduler.bm.check_invariants()
    assert eng.scheduler.bm.num_used_blocks == 0
    # aborted before the prefill: the choices that never forked end too
    eng.add_request(GenerationRequest("b", prompt, SamplingParams(max_tokens=5, n=2)))
    assert sorted(o.index for o in eng.abort_all("b")) == [0, 1] and not eng.seqs


def test_one_choice_aborted_alone(tiny):
    model, mc, _ = tiny
    prompt = random_prompt(mc.vocab_size, 6, seed=8)
    eng = make_engine(model, mc)
    eng.add_request(GenerationRequest("c", prompt, SamplingParams(max_tokens=6, ignore_eos=True, n=2, seed=3)))
    eng.step()
    (out,) = eng.abort_all("c#1")
    assert out.request_id == "c" and out.index == 1 and out.finish_reason == "abort"
    done = [o for _ in range(20) if eng.has_unfinished() for o in eng.step() if o.finished]
    assert [(o.index, o.finish_reason) for o in done] == [(0, "length")]
    assert eng.scheduler.bm.num_used_blocks == 0


def test_quantized_cache_forks_by_recompute(tiny):
    model, mc, _ = tiny
    prompt = random_prompt(mc.vocab_size, 10, seed=9)
    eng = make_engine(model, mc, cp=CachePolicyConfig(key_quantization="int8", value_quantization="int8",
                                                         group_size=4))
    choices, reasons = _run(eng, "q", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, n=2))
    # (no token equality: a quantized KV depends on chunk boundaries, and the recompute has other ones)
    assert [len(c) for c in choices] == [4, 4] and set(reasons.values()) == {"length"}
    assert choices[0][0] == choices[1][0]  # greedy first tokens come from the same logits
    assert eng.scheduler.bm.num_used_blocks == 0


def test_a_seed_beyond_64_bits_is_refused_before_it_reaches_the_step(tiny):
    import pytest
    from kvfleet.dataplane.engine.api import InvalidRequest

    model, mc, _ = tiny
    eng = make_engine(model, mc)
    with pytest.raises(InvalidRequest) as e:
        eng.add_request(GenerationRequest("s", [1, 2, 3], SamplingParams(seed=2**64 - 2, n=4, temperature=1.0)))
    assert e.value.param == "seed" and not eng.has_unfinished()
