"""The compiled CPU kernels against the torch code they replace, and the engine with and without them.

The kernels must build here (a C++ compiler is part of the test environment): a build failure
fails these tests instead of letting the engine fall back silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.kernels.cpu import KernelUnavailable, build_dir, kernels_for, load_cpu_ops
from kvfleet.dataplane.model.llama import RMSNorm, apply_rope
from kvfleet.dataplane.model.loader import load_model


@pytest.fixture(scope="module")
def ops():
    return load_cpu_ops()


def _paged(seed: int, lens: list[int], hkv: int, d: int, bs: int, dtype: torch.dtype):
    """A scattered paged cache holding len(lens) sequences; returns cache, tables [B, M] (with slack
    columns, sliced so rows are strided as the runner's are), lens."""
    g = torch.Generator().manual_seed(seed)
    m = max(-(-n // bs) for n in lens)
    nb = len(lens) * (m + 2) + 1
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    wide = (torch.randperm(nb - 1, generator=g)[:len(lens) * (m + 2)] + 1).view(len(lens), m + 2)
    return kc, vc, wide[:, :m], torch.tensor(lens)


def _reference(q, kc, vc, tables, lens):
    """The torch path: gather padded blocks, masked SDPA with the query group folded."""
    b, hq, d = q.shape
    hkv = kc.shape[2]
    k, v = kc[tables].flatten(1, 2), vc[tables].flatten(1, 2)  # [B, M * bs, Hkv, D]
    mask = (torch.arange(k.shape[1])[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.reshape(b, hq, d)


@pytest.mark.parametrize(("hq", "hkv", "d", "bs"), [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 32), (6, 1, 16, 4)])
def test_decode_attention_matches_gather_and_sdpa(ops, hq: int, hkv: int, d: int, bs: int) -> None:
    lens = [1, bs, bs + 1, 3 * bs - 1, 5 * bs]
    kc, vc, tables, ctx = _paged(hq * d + bs, lens, hkv, d, bs, torch.float32)
    # q rows strided like the model's (views of the qkv rows)
    qkv = torch.randn(len(lens), (hq + 2 * hkv) * d, generator=torch.Generator().manual_seed(1))
    q = qkv[:, :hq * d].view(len(lens), hq, d)
    assert not tables.is_contiguous() and not q.is_contiguous()
    got = ops.paged_decode_attention(q, kc, vc, tables, ctx, d ** -0.5)
    torch.testing.assert_close(got, _reference(q, kc, vc, tables, ctx), rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_only_each_sequences_own_slots(ops) -> None:
    kc, vc, tables, ctx = _paged(3, [5, 20], 2, 16, 8, torch.float32)
    q = torch.randn(2, 4, 16)
    before = ops.paged_decode_attention(q, kc, vc, tables, ctx, 0.25)
    kc[tables[0, 0], 5:] = 1e4  # past sequence 0's 5 tokens: must not be read
    vc[tables[1, 2], 4:] = float("nan")  # past sequence 1's 20 tokens
    after = ops.paged_decode_attention(q, kc, vc, tables, ctx, 0.25)
    torch.testing.assert_close(after, before)
    kc[tables[0, 0], 4] += 1.0  # within sequence 0: changes its output
    assert not torch.allclose(ops.paged_decode_attention(q, kc, vc, tables, ctx, 0.25)[0], before[0])


def test_decode_attention_bfloat16(ops) -> None:
    kc, vc, tables, ctx = _paged(5, [7, 33, 64], 3, 64, 16, torch.bfloat16)
    q = torch.randn(3, 9, 64).to(torch.bfloat16)
    got = ops.paged_decode_attention(q, kc, vc, tables, ctx, 0.125)
    want = _reference(q.float(), kc.float(), vc.float(), tables, ctx)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_decode_attention_refuses_bad_input(ops) -> None:
    kc, vc, tables, ctx = _paged(0, [4, 9], 2, 16, 8, torch.float32)
    q = torch.randn(2, 4, 16)
    with pytest.raises(RuntimeError, match="outside the block table"):
        ops.paged_decode_attention(q, kc, vc, tables, torch.tensor([4, 9 + 8 * 5]), 0.25)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_decode_attention(q, kc, vc, tables.int(), ctx, 0.25)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.paged_decode_attention(q.double(), kc, vc, tables, ctx, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_rmsnorm(ops, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, delta = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    with torch.inference_mode():
        torch.testing.assert_close(ops.rms_norm(x, norm.weight, norm.eps), norm(x), **tol)
        summed, normed = ops.add_rms_norm(x, delta, norm.weight, norm.eps)
        torch.testing.assert_close(summed, x + delta, rtol=0, atol=0)
        torch.testing.assert_close(normed, norm(x + delta), **tol)


def test_rope_in_place_matches_apply_rope(ops) -> None:
    torch.manual_seed(0)
    t, hq, hkv, d = 5, 6, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    angles = torch.randn(t, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [T, D]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    want_q = apply_rope(q.reshape(t, hq, d), cos[:, None], sin[:, None])
    want_k = apply_rope(k.reshape(t, hkv, d), cos[:, None], sin[:, None])
    v_before = v.clone()
    ops.rope_(qkv, cos, sin, hq, hkv)
    torch.testing.assert_close(q.reshape(t, hq, d), want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k.reshape(t, hkv, d), want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, v_before)  # values are not rotated


def test_build_is_cached_outside_the_repo(ops) -> None:
    assert list(build_dir().glob("*.so")), "the compiled module lives in the version-keyed cache"
    assert kernels_for("off") is None
    assert kernels_for("on") is ops


def test_mode_on_fails_loudly_and_auto_falls_back(monkeypatch) -> None:
    import kvfleet.dataplane.kernels.cpu as cpu

    def broken():
        raise KernelUnavailable("no C++ compiler ('c++' not on PATH)")

    monkeypatch.setattr(cpu, "load_cpu_ops", broken)
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler"):
        cpu.kernels_for("on")
    assert cpu.kernels_for("auto") is None


INT4_R = CachePolicyConfig(key_quantization="int4", value_quantization="int4", group_size=8, residual_tokens=8,
                           quant_sink_tokens=4)
# (policy, the decode attention kernel it must use): stats per group of blocks, per token, no lanes,
# and keys stored before RoPE (no fused kernel: dequantized in torch, then the exact-cache kernel)
POLICIES = [
    (None, "paged_decode_attention"),
    (INT4_R, "quant_decode_attention"),
    (CachePolicyConfig(key_quantization="int4", value_quantization="int4", group_size=16, residual_tokens=16,
                       quant_sink_tokens=4), "quant_decode_attention"),
    (CachePolicyConfig(key_quantization="int8", value_quantization="int8", key_granularity="per-token",
                       group_size=8), "quant_decode_attention"),
    (CachePolicyConfig(key_quantization="int4", value_quantization="int4", group_size=8, residual_tokens=8,
                       quant_sink_tokens=4, keys_pre_rope=True), "paged_decode_attention"),
    (CachePolicyConfig(key_quantization="int4", value_quantization="int4", key_granularity="per-token",
                       group_size=8, residual_tokens=8, quant_sink_tokens=4, rotate_keys=True),
     "quant_decode_attention"),
]


def _generate(model_dir: str, kernels: str, prompts: list[list[int]], max_tokens: int,
              policy: CachePolicyConfig | None = None) -> tuple[list, LLMEngine]:
    model, mc = load_model(model_dir, dtype=torch.float32, device="cpu")
    cfg = EngineConfig(model_dir=model_dir, dtype="float32", device="cpu", num_kv_blocks=96, max_num_seqs=4,
                       block_size=8, cpu_kernels=kernels, cache_policy=policy or CachePolicyConfig())
    engine = LLMEngine(model, mc, cfg, "cpu", torch.float32)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.new_token_ids for o in engine.generate(prompts, params)], engine


@pytest.mark.parametrize(("policy", "attention"), POLICIES,
                         ids=["exact", "int4+R", "int4+R-group16", "int8-per-token", "int4+R-preRoPE",
                              "int4-rotated-keys+R"])
def test_engine_tokens_equal_with_and_without_kernels(tiny_model_dir, monkeypatch, policy, attention) -> None:
    """Exact cache: decode attention reads the blocks; int8/int4: it dequantizes the codes as it reads them."""
    prompts = [[5 + i, 17, 3 * i + 1, 40, 2] * (i + 2) for i in range(6)]  # 6 > max_num_seqs: queued, chunked
    calls: list[str] = []
    ops = load_cpu_ops()

    class Counting:  # proves the kernels ran (a silent fall-back to torch would pass the comparison)
        def __getattr__(self, name: str):
            calls.append(name)
            return getattr(ops, name)

    monkeypatch.setattr("kvfleet.dataplane.kernels.cpu.load_cpu_ops", lambda: Counting())
    with_kernels, engine = _generate(str(tiny_model_dir), "on", prompts, 20, policy)
    assert engine.kernels is not None
    assert {attention, "rms_norm", "add_rms_norm", "rope_"} <= set(calls)
    without, engine_off = _generate(str(tiny_model_dir), "off", prompts, 20, policy)
    assert engine_off.kernels is None
    assert with_kernels == without
