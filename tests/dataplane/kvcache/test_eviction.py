"""Eviction policies keep exactly what they should on crafted inputs, under the budget."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.kvcache.eviction import (
    EvictionSpec,
    EvictionState,
    attention_probs,
    keydiff_scores,
    protected_mask,
    select_keep,
    snapkv_scores,
    streaming_scores,
)

H, D = 2, 8


def _pos(n: int) -> torch.Tensor:
    return torch.arange(n)[:, None].expand(n, H).contiguous()


def test_streaming_keeps_exactly_sinks_and_recent_window() -> None:
    n, sinks, window, budget = 40, 4, 8, 12
    pos = _pos(n)
    keep = select_keep(streaming_scores(pos), protected_mask(pos, n, sinks, window), budget)
    want = list(range(sinks)) + list(range(n - window, n))
    for h in range(H):
        assert keep[:, h].tolist() == want


def test_select_keep_respects_budget_and_protection_and_sorts() -> None:
    scores = torch.tensor([[5.0, 0.0], [1.0, 9.0], [9.0, 1.0], [0.0, 5.0], [2.0, 2.0]])
    prot = torch.zeros(5, H, dtype=torch.bool)
    prot[4] = True
    keep = select_keep(scores, prot, 3)
    assert keep.shape == (3, H)
    assert keep[:, 0].tolist() == [0, 2, 4] and keep[:, 1].tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="smaller than the 5 protected"):
        select_keep(scores, torch.ones(5, H, dtype=torch.bool), 3)
    assert select_keep(scores, prot, 10).shape == (5, H)  # nothing to drop


def test_h2o_keeps_heavy_hitters_plus_window() -> None:
    n, hq = 32, 4
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(n, H, D, generator=g) * 0.1
    heavy = {0: [3, 11], 1: [7, 20]}  # per kv head, the keys every query looks at
    q = torch.randn(n, hq, D, generator=g) * 0.1
    for h, rows in heavy.items():
        for r in rows:
            keys[r, h] = 0.0
            keys[r, h, r % D] = 6.0
        for qh in (2 * h, 2 * h + 1):
            q[:, qh] = 0.0
            for r in rows:
                q[:, qh, r % D] += 6.0
    spec = EvictionSpec("h2o", budget_tokens=8, window_tokens=4, sink_tokens=0)
    st = EvictionState(spec)
    visible = torch.ones(n, n, dtype=torch.bool).tril()[None]
    st.observe(0, q, torch.arange(n), attention_probs(q, keys, visible), H)
    pos = _pos(n)
    keep = select_keep(st.scores(0, keys, pos), protected_mask(pos, n, 0, 4), 8)
    for h, rows in heavy.items():
        kept = set(keep[:, h].tolist())
        assert set(rows) <= kept and set(range(n - 4, n)) <= kept


def test_h2o_accumulates_across_steps_and_reindexes_after_eviction() -> None:
    st = EvictionState(EvictionSpec("h2o", budget_tokens=8, window_tokens=2, sink_tokens=0))
    probs = torch.full((4, 1, 3), 1 / 3)  # Hq=4 (2 per kv head), 1 query, 3 keys
    st.observe(0, torch.zeros(1, 4, D), torch.tensor([2]), probs, H)
    st.observe(0, torch.zeros(1, 4, D), torch.tensor([3]), torch.full((4, 1, 4), 0.25), H)
    assert torch.allclose(st.acc[0][:, 0], torch.tensor([2 / 3 + 0.5] * 3 + [0.5]))
    st.evicted(0, torch.tensor([[1, 1], [3, 3]]))
    assert st.acc[0].shape == (2, H)


def test_snapkv_keeps_what_the_observation_window_reads_with_pooling() -> None:
    n, w = 48, 4
    keys = torch.zeros(n, H, D)
    keys[:, :, 0] = 1.0
    needle = {0: 10, 1: 25}
    q = torch.zeros(w, 2 * H, D)
    for h, r in needle.items():
        keys[r, h] = 0.0
        keys[r, h, 1] = 8.0
        q[:, 2 * h: 2 * h + 2, 1] = 8.0
    s = snapkv_scores(q, torch.arange(n - w, n), keys, _pos(n), kernel=3)
    for h, r in needle.items():
        top = s[:, h].topk(3).indices.sort().values.tolist()
        assert top == [r - 1, r, r + 1]  # max-pool spreads the vote to the neighbours
    st = EvictionState(EvictionSpec("snapkv", budget_tokens=16, window_tokens=4, observation_window=w,
                                    pooling_kernel=1))
    st.observe(0, torch.randn(n, 2 * H, D), torch.arange(n), None, H)
    assert st.q_win[0].shape == (w, 2 * H, D) and st.q_pos[0].tolist() == list(range(n - w, n))


def test_snapkv_queries_never_vote_for_their_future() -> None:
    keys = torch.zeros(6, H, D)
    keys[5, :, 1] = 10.0
    q = torch.zeros(1, 2 * H, D)
    q[:, :, 1] = 10.0
    s = snapkv_scores(q, torch.tensor([3]), keys, _pos(6), kernel=1)
    assert (s[4:] == 0).all()


def test_keydiff_keeps_the_most_distinct_keys() -> None:
    n = 20
    keys = torch.zeros(n, H, D)
    keys[:, :, 0] = 1.0
    keys[:, :, 1] = torch.linspace(0, 0.1, n)[:, None]
    keys[5, 0] = torch.tensor([0.0, 0, 1, 0, 0, 0, 0, 0])
    keys[9, 1] = torch.tensor([-1.0, 0, 0, 0, 0, 0, 0, 0])
    scores = keydiff_scores(keys)
    assert scores[:, 0].argmax() == 5 and scores[:, 1].argmax() == 9


def test_budgets_tokens_ratio_and_pyramid() -> None:
    spec = EvictionSpec("keydiff", budget_tokens=100, window_tokens=8, sink_tokens=4)
    assert spec.layer_budget(0, 4, 1000, 12) == 100
    r = EvictionSpec("keydiff", budget_ratio=0.25, window_tokens=8, sink_tokens=4)
    assert r.layer_budget(0, 4, 1000, 12) == 250 and r.layer_budget(0, 4, 20, 12) == 12
    p = EvictionSpec("keydiff", budget_tokens=100, window_tokens=8, sink_tokens=4, pyramid=True)
    budgets = [p.layer_budget(layer, 5, 1000, 12) for layer in range(5)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] == 150 and budgets[-1] == 50
    assert sum(budgets) == 500


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="exactly one of budgetTokens or budgetRatio"):
        EvictionSpec("h2o")
    with pytest.raises(ValueError, match="must exceed sinkTokens 4 \\+ windowTokens 32"):
        EvictionSpec("h2o", budget_tokens=36)
    with pytest.raises(ValueError, match="takes no budget"):
        EvictionSpec("none", budget_tokens=64)
    with pytest.raises(ValueError, match="poolingKernel"):
        EvictionSpec("snapkv", budget_ratio=0.5, pooling_kernel=4)
    with pytest.raises(ValueError, match="not in"):
        EvictionSpec("lru", budget_ratio=0.5)
