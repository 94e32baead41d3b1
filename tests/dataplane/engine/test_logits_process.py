"""Penalties, logit_bias and min_tokens: the batched processing equals a direct per-token computation,
and the engine applies it (greedy decoding with penalties equals a reference loop on the logits)."""

from __future__ import annotations

import torch
from engine_testlib import make_engine, random_prompt
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.logits_process import apply_token_bitmask, process_logits, row_history
from kvfleet.dataplane.engine.sampler import sample

V = 40


def _direct(x: torch.Tensor, sp: SamplingParams, prompt: list[int], out: list[int], eos: set[int]) -> torch.Tensor:
    """The specification, one token at a time."""
    x = x.clone()
    for t, b in sp.logit_bias:
        x[t] += b
    if len(out) < sp.min_tokens:
        for t in set(sp.stop_token_ids) | (set() if sp.ignore_eos else eos):
            x[t] = float("-inf")
    for t in range(len(x)):
        if sp.repetition_penalty != 1.0 and (t in prompt or t in out):
            x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
        c = out.count(t)
        x[t] -= sp.frequency_penalty * c + sp.presence_penalty * (c > 0)
    return x


def test_batched_processing_equals_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, V, generator=g) * 3
    prompts = [[1, 2, 3, 3], [5, 6], [7], [1, 1, 9], [2]]
    outs = [[3, 3, 4, 10], [6, 6, 6], [], [9, 8], [0]]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(repetition_penalty=1.7, logit_bias=((6, 2.0), (11, -100.0))),
        SamplingParams(min_tokens=2, stop_token_ids=(4,)),
        SamplingParams(),  # untouched row in a processed batch
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.0, presence_penalty=2.0, min_tokens=1),
    ]
    eos = {0}
    hist = [row_history(sp, p + o, len(p), eos) for sp, p, o in zip(params, prompts, outs, strict=True)]
    assert hist[3] is None
    got = process_logits(x, params, hist)
    for r in range(5):
        want = _direct(x[r], params[r], prompts[r], outs[r], eos)
        assert torch.allclose(got[r], want, atol=1e-5), r
    assert got[2, 0] == float("-inf") and got[2, 4] == float("-inf")  # min_tokens bans eos and stop ids
    assert torch.equal(x[3], got[3])


def test_logit_bias_minus_100_bans_and_plus_100_forces():
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    best = int(x[0].argmax())
    params = [SamplingParams(temperature=0.0, logit_bias=((best, -100.0),)),
              SamplingParams(temperature=1.0, logit_bias=((17, 100.0),))]
    hist = [row_history(sp, [1], 1, ()) for sp in params]
    for s in range(50):
        res = sample(x, params, [None, torch.Generator().manual_seed(s)], hist)
        assert res.token_ids[0] != best and res.token_ids[1] == 17


def test_bitmask_allows_exactly_the_set_bits():
    x = torch.zeros(3, 70)
    allowed = [{0, 31, 32, 69}, {5}]
    words = torch.zeros(2, 3, dtype=torch.int32)
    for r, toks in enumerate(allowed):
        for t in toks:
            words[r, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    y = apply_token_bitmask(x.clone(), [0, 2], words)
    assert {int(t) for t in torch.nonzero(y[0] == 0)} == allowed[0]
    assert {int(t) for t in torch.nonzero(y[2] == 0)} == allowed[1]
    assert torch.equal(y[1], x[1])


def test_engine_greedy_with_penalties_equals_a_reference_loop(tiny):
    model, mc, _ = tiny
    prompt = random_prompt(mc.vocab_size, 9, seed=3)
    eng = make_engine(model, mc)
    plain = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    # the plain continuation goes into the prompt, so the repetition penalty has something to act on
    prompt = prompt + plain.new_token_ids[:6]
    plain = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    # a bias towards a prompt token (which the penalties then push back) and against the greedy choice
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=0.3,
                        frequency_penalty=0.2, repetition_penalty=1.3,
                        logit_bias=((prompt[0], 0.5), (plain.new_token_ids[0], -5.0)))
    got = eng.generate([prompt], sp)[0].new_token_ids
    # the reference: full forward each step (no cache), penalties computed directly on the last logits
    from kvfleet.dataplane.model.attention import DenseAttention

    toks = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            hidden = model.forward(torch.tensor(toks), torch.arange(len(toks)), DenseAttention())
            logits = model.compute_logits(hidden[-1:])[0].float()
            toks.append(int(_direct(logits, sp, prompt, toks[len(prompt):], set()).argmax()))
    assert got == toks[len(prompt):]
    assert got != plain.new_token_ids  # the penalties did change something


def test_engine_min_tokens_holds_back_the_stop_token(tiny):
    model, mc, _ = tiny
    prompt = random_prompt(mc.vocab_size, 6, seed=4)
    eng = make_engine(model, mc)
    first = eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0].new_token_ids[0]
    stopped = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(first,)))[0]
    assert stopped.new_token_ids == [first] and stopped.finish_reason == "stop"
    held = eng.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(first,),
                                                 min_tokens=3))[0]
    assert len(held.new_token_ids) >= 3 and first not in held.new_token_ids[:3]
