"""PolicyAttention: the seam behaves like DenseAttention without a policy, composes codecs with eviction,
respects budgets, accounts bytes exactly, and never mixes sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from kvfleet.dataplane.config import CachePolicyConfig
from kvfleet.dataplane.kvcache.eviction import EvictionSpec
from kvfleet.dataplane.kvcache.policy import BatchedPolicyAttention, PolicyAttention, PolicySpec, QuantSpec
from kvfleet.dataplane.model.attention import DenseAttention

L, HQ, H, D = 3, 4, 2, 16
EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "03-cachepolicy.yaml"


def _steps(prefill: int, decode: int, seed: int = 0) -> list[list[tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(seed)

    def chunk(t: int) -> list[tuple[torch.Tensor, ...]]:
        return [(torch.randn(t, HQ, D, generator=g), torch.randn(t, H, D, generator=g),
                 torch.randn(t, H, D, generator=g)) for _ in range(L)]

    return [chunk(prefill)] + [chunk(1) for _ in range(decode)]


def _run(backend, steps) -> list[torch.Tensor]:  # noqa: ANN001
    return [backend.attend(layer, *qkv) for step in steps for layer, qkv in enumerate(step)]


def _policy(dtype: str = "none", ev: str = "none", **kw) -> PolicySpec:  # noqa: ANN003
    q = QuantSpec(dtype, group_size=8, residual_tokens=kw.pop("residual", 0), sink_tokens=kw.pop("qsinks", 0))
    e = EvictionSpec(ev) if ev == "none" else EvictionSpec(ev, window_tokens=4, sink_tokens=2, **kw)
    return PolicySpec(q, e)


def test_no_policy_is_bit_identical_to_dense_attention() -> None:
    steps = _steps(37, 12) + [_steps(5, 0, seed=1)[0]]  # prefill, decode, a second multi-token chunk
    dense, pol = _run(DenseAttention(), steps), _run(PolicyAttention(PolicySpec(), L, H, D), steps)
    assert all(torch.equal(a, b) for a, b in zip(dense, pol, strict=True))


@pytest.mark.parametrize("dtype,tol", [("fp16", 5e-3), ("fp8", 0.15), ("int8", 0.03), ("int4", 0.4)])
def test_quantized_cache_stays_close_to_dense(dtype: str, tol: float) -> None:
    steps = _steps(40, 8)
    dense = _run(DenseAttention(), steps)
    pol = _run(PolicyAttention(_policy(dtype), L, H, D), steps)
    err = max((a - b).abs().max().item() for a, b in zip(dense, pol, strict=True))
    assert 0 < err < tol


@pytest.mark.parametrize("ev", ["streaming-llm", "h2o", "snapkv", "keydiff"])
@pytest.mark.parametrize("dtype", ["none", "int8", "int4"])
def test_every_codec_composes_with_every_eviction_policy_under_budget(dtype: str, ev: str) -> None:
    spec = _policy(dtype, ev, budget_tokens=24, residual=4, qsinks=2)
    attn = PolicyAttention(spec, L, H, D)
    for step in _steps(40, 20):
        for layer, qkv in enumerate(step):
            out = attn.attend(layer, *qkv)
            assert out.shape == qkv[0].shape and torch.isfinite(out).all()
            assert len(attn.layers[layer]) <= 24
    st = attn.layers[0]
    assert attn.tokens_seen() == 60 and len(st) == 24
    # sinks (positions 0, 1) and the recent window (56..59) survive in every head
    for h in range(H):
        kept = set(st.pos[:, h].tolist())
        assert {0, 1, 56, 57, 58, 59} <= kept


def test_streaming_policy_keeps_the_same_tokens_as_a_dense_cache_of_sinks_and_window() -> None:
    spec = _policy("none", "streaming-llm", budget_tokens=10)
    attn = PolicyAttention(spec, L, H, D)
    steps = _steps(30, 1)
    _run(attn, steps)
    k_all = torch.cat([steps[0][0][1], steps[1][0][1]])  # layer 0 keys of all 31 tokens
    keep = [0, 1] + list(range(23, 31))
    k_cache, _ = attn.layers[0].materialize()
    assert torch.equal(k_cache, k_all[keep])


def test_bytes_accounting_equals_allocated_tensors() -> None:
    spec = _policy("int4", residual=4, qsinks=8)  # groups end at multiples of 8: after the sinks, whole
    attn = PolicyAttention(spec, L, H, D)
    _run(attn, _steps(8 + 3 * 8 + 4, 0))  # sinks + 3 full groups + residual
    st = attn.layers[0]
    fp = 2 * (8 + 4) * H * D * 4  # K and V, sinks + residual, float32
    assert st.nbytes() == fp + 3 * 8 * (attn.kc.bytes_per_token() + attn.vc.bytes_per_token())
    assert attn.nbytes() == L * st.nbytes()
    assert attn.codec_bytes_per_token() == L * (attn.kc.bytes_per_token() + attn.vc.bytes_per_token())


def test_eviction_frees_storage() -> None:
    full = PolicyAttention(_policy("int8"), L, H, D)
    evicted = PolicyAttention(_policy("int8", "keydiff", budget_ratio=0.25), L, H, D)
    steps = _steps(64, 8)
    _run(full, steps)
    _run(evicted, steps)
    assert evicted.nbytes() < 0.4 * full.nbytes()


def test_fp_store_dtype_halves_the_full_precision_parts() -> None:
    a = PolicyAttention(PolicySpec(), L, H, D, fp_store_dtype=torch.bfloat16)
    b = PolicyAttention(PolicySpec(), L, H, D)
    steps = _steps(16, 2)
    out_a, out_b = _run(a, steps), _run(b, steps)
    assert a.nbytes() * 2 == b.nbytes()
    assert max((x - y).abs().max().item() for x, y in zip(out_a, out_b, strict=True)) < 0.05


def test_keys_pre_rope_unrotates_and_rerotates() -> None:
    theta = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))

    def rope(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.outer(pos.float(), theta)
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()

    steps = _steps(24, 4)
    dense = _run(DenseAttention(), steps)
    spec = PolicySpec(QuantSpec("int8", group_size=8, keys_pre_rope=True))
    pre = _run(PolicyAttention(spec, L, H, D, rope=rope), steps)
    assert max((a - b).abs().max().item() for a, b in zip(dense, pre, strict=True)) < 0.03
    with pytest.raises(ValueError, match="rope table"):
        PolicyAttention(spec, L, H, D)


def test_ingest_replays_a_prefill_exactly() -> None:
    spec = _policy("int4", "h2o", budget_tokens=20, residual=4)
    steps = _steps(32, 6)
    live, replayed = PolicyAttention(spec, L, H, D), PolicyAttention(spec, L, H, D)
    _run(live, steps[:1])
    for layer, qkv in enumerate(steps[0]):
        replayed.ingest(layer, *qkv)
    a, b = _run(live, steps[1:]), _run(replayed, steps[1:])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_batched_sequences_never_see_each_other() -> None:
    spec = _policy("int8", "h2o", budget_tokens=12)
    alone = PolicyAttention(spec, L, H, D)
    b_steps = _steps(20, 5, seed=2)
    want = _run(alone, b_steps)
    batched = BatchedPolicyAttention(lambda: PolicyAttention(spec, L, H, D))
    a_steps = _steps(30, 5, seed=3)
    got = []
    for sa, sb in zip(a_steps, b_steps, strict=True):
        ta, tb = sa[0][0].shape[0], sb[0][0].shape[0]
        batched.set_batch([("a", ta), ("b", tb)])
        for layer in range(L):
            qkv = [torch.cat([x, y]) for x, y in zip(sa[layer], sb[layer], strict=True)]
            got.append(batched.attend(layer, *qkv)[ta:])
    assert all(torch.equal(x, y) for x, y in zip(want, got, strict=True))
    batched.release("a")
    assert set(batched.seqs) == {"b"}


def test_invalid_combinations_are_rejected() -> None:
    # per-channel keys keep up to groupSize - 1 more tokens in the full-precision tail
    too_small = PolicySpec(QuantSpec("int4", "per-channel", group_size=32, residual_tokens=32, sink_tokens=4),
                           EvictionSpec("h2o", budget_tokens=64, window_tokens=32, sink_tokens=4))
    with pytest.raises(ValueError, match="never evicted"):
        too_small.validate_for(3, 64)
    with pytest.raises(ValueError, match="must divide head_dim 64"):
        PolicySpec(QuantSpec("int4", "per-token", "per-token", group_size=48)).validate_for(3, 64)
    with pytest.raises(ValueError, match="keysPreRope needs a quantized dtype"):
        QuantSpec("none", keys_pre_rope=True)
    with pytest.raises(ValueError, match="unknown field"):
        PolicySpec.from_dict({"quantization": {"dtype": "int8", "bits": 3}})


def test_policy_spec_from_resource_yaml_and_engine_config_agree() -> None:
    docs = [d for d in yaml.safe_load_all(EXAMPLES.read_text()) if d]
    for doc in docs:
        from_yaml = PolicySpec.from_dict(doc)
        from_cfg = PolicySpec.from_config(CachePolicyConfig.from_spec(doc["spec"]), name=from_yaml.name)
        assert from_yaml == from_cfg
    long_ctx = PolicySpec.from_dict(docs[1])
    assert long_ctx.name == "long-context" and long_ctx.quant.dtype == "int4"
    assert long_ctx.eviction.policy == "keydiff" and long_ctx.eviction.budget_ratio == 0.5
    # split key/value dtypes through the engine config
    split = PolicySpec.from_config(CachePolicyConfig(key_quantization="int8", value_quantization="int4"))
    kc, vc = split.quant.codecs(3, 64, torch.float32)
    assert (kc.dtype, vc.dtype) == ("int8", "int4")


def test_pyramid_budgets_shrink_with_depth() -> None:
    spec = PolicySpec(eviction=EvictionSpec("keydiff", budget_tokens=20, window_tokens=4, sink_tokens=2,
                                            pyramid=True))
    attn = PolicyAttention(spec, L, H, D)
    _run(attn, _steps(60, 2))
    kept = [len(attn.layers[layer]) for layer in range(L)]
    assert kept == [30, 20, 10]  # (1 + 0.5), 1, (1 - 0.5) x budget
