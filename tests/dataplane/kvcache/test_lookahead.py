"""LookaheadKV module: shapes, the lookahead forward equals a dense forward of the same tokens, checkpoints."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.kvcache.eviction import EvictionSpec, attention_probs, received_attention
from kvfleet.dataplane.kvcache.lookahead import LookaheadConfig, LookaheadKV
from kvfleet.dataplane.kvcache.policy import PolicyAttention, PolicySpec
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama

from kvfleet.tools.eval_tf import prefill


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    return load_model(d, dtype=torch.float32, device="cpu")


def test_mass_shapes_and_totals(tiny):
    model, cfg = tiny
    mod = LookaheadKV(cfg, LookaheadConfig(num_tokens=3, rank=2), seed=0)
    pre = prefill(model, list(range(5, 45)))
    mass = mod.mass(model, pre.k, pre.v)
    assert len(mass) == cfg.num_hidden_layers
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for m in mass:
        assert m.shape == (40, cfg.num_key_value_heads) and m.dtype == torch.float32
        assert (m >= 0).all()
        # each of the 3 queries x group spreads < 1 over the prompt (the rest on the lookahead tokens)
        assert (m.sum(0) < 3 * group).all() and (m.sum(0) > 0).all()
    pooled = mod.scores(model, pre.k, pre.v, kernel=3)
    assert all(p.shape == m.shape and (p >= m).all() for p, m in zip(pooled, mass, strict=True))
    assert mod.num_parameters() == 3 * cfg.hidden_size + cfg.num_hidden_layers * 2 * (
        cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size)


def test_untrained_lookahead_equals_dense_forward_of_its_tokens(tiny):
    """With the low-rank update at zero and token embeddings as inputs, the lookahead queries are the
    model's own queries for those tokens after the prompt: their attention on the prompt must match."""
    model, cfg = tiny
    prompt, extra = list(range(7, 37)), [3, 11, 19, 23]
    mod = LookaheadKV(cfg, LookaheadConfig(num_tokens=4), seed=1)
    mod.init_embeddings(model, extra)
    pre = prefill(model, prompt)
    got = mod.mass(model, pre.k, pre.v)
    whole = prefill(model, prompt + extra, window=4)
    p = len(prompt)
    for layer in range(cfg.num_hidden_layers):
        k = whole.k[layer]
        vis = (torch.arange(p + 4)[None, :] <= torch.arange(p, p + 4)[:, None])[None]
        want = received_attention(attention_probs(whole.q_win[layer], k, vis), k.shape[1])[:p]
        assert torch.allclose(got[layer], want, atol=1e-5), (got[layer] - want).abs().max()
    # a non-zero update changes the queries (so the test above can tell)
    with torch.no_grad():
        mod.lora_b.normal_(generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(mod.mass(model, pre.k, pre.v)[-1], got[-1])


def test_gradients_reach_only_the_module(tiny):
    model, cfg = tiny
    model.requires_grad_(False)
    mod = LookaheadKV(cfg, LookaheadConfig(num_tokens=2, rank=2), seed=0)
    with torch.no_grad():
        pre = prefill(model, list(range(5, 25)))
        keys, values = [k.clone() for k in pre.k], [v.clone() for v in pre.v]
    loss = sum(m[4:10].sum() for m in mod.mass(model, keys, values))
    loss.backward()
    assert mod.embed.grad is not None and mod.embed.grad.abs().sum() > 0
    assert mod.lora_b.grad is not None and mod.lora_b.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_save_load_round_trip(tiny, tmp_path):
    model, cfg = tiny
    mod = LookaheadKV(cfg, LookaheadConfig(num_tokens=2, rank=3, alpha=6.0), seed=5)
    with torch.no_grad():
        mod.lora_b.normal_(generator=torch.Generator().manual_seed(1))
    mod.save(tmp_path, {"recipe": "test"})
    back = LookaheadKV.load(tmp_path, cfg)
    assert back.cfg == mod.cfg and back.scale == 2.0
    pre = prefill(model, list(range(5, 30)))
    assert all(torch.equal(a, b) for a, b in zip(back.mass(model, pre.k, pre.v), mod.mass(model, pre.k, pre.v),
                                                 strict=True))


def test_stepwise_policy_attention_refuses_lookahead(tiny):
    _, cfg = tiny
    spec = PolicySpec(eviction=EvictionSpec("lookahead", budget_ratio=0.4))
    with pytest.raises(ValueError, match="teacher-forced evaluator"):
        PolicyAttention(spec, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
