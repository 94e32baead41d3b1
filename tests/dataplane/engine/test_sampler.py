"""Sampler: greedy, top-k/top-p support, seeded reproducibility, logprobs."""

from __future__ import annotations

import torch
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.sampler import sample


def _logits(n=4, v=50, seed=0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_degenerate_filters_pick_the_argmax():
    x = _logits()
    best = x.argmax(-1).tolist()
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1),
              SamplingParams(top_p=1e-6), SamplingParams(temperature=1e-4)]
    assert sample(x, params, [None] * 4).token_ids == best


def test_top_k_and_top_p_restrict_the_support():
    x = _logits(1, 50, seed=1)
    top3 = set(x[0].topk(3).indices.tolist())
    probs = x[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.5).sum()) + 1].tolist())  # smallest set with mass >= 0.5
    seen_k, seen_p = set(), set()
    for s in range(300):
        g = torch.Generator().manual_seed(s)
        seen_k.add(sample(x, [SamplingParams(top_k=3)], [g]).token_ids[0])
        g = torch.Generator().manual_seed(s)
        seen_p.add(sample(x, [SamplingParams(top_p=0.5)], [g]).token_ids[0])
    assert seen_k == top3
    assert seen_p <= nucleus and len(seen_p) >= 1


def test_seeded_rows_do_not_depend_on_the_batch():
    x = _logits(3, 50, seed=2)
    sp = SamplingParams(temperature=0.8, seed=7)
    alone = [sample(x[1:2], [sp], [torch.Generator().manual_seed(7)]).token_ids[0]]
    g = torch.Generator().manual_seed(7)
    mixed = sample(x, [SamplingParams(temperature=1.0), sp, SamplingParams(temperature=0.0)],
                   [None, g, None]).token_ids
    assert mixed[1] == alone[0]


def test_logprobs_are_the_models_distribution():
    x = _logits(2, 30, seed=3)
    res = sample(x, [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0)], [None, None])
    lp = torch.log_softmax(x, -1)
    first = res.logprobs[0]
    assert first.token_id == res.token_ids[0]
    assert abs(first.logprob - lp[0, first.token_id].item()) < 1e-6
    assert [t for t, _ in first.top] == lp[0].topk(2).indices.tolist()
    assert res.logprobs[1] is None
