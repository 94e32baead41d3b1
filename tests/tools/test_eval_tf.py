"""Teacher forcing in one forward equals stepwise decoding through `PolicyAttention` (tiny model)."""

from __future__ import annotations

import random

import pytest
import torch
from kvfleet.dataplane.kvcache.eviction import EvictionSpec
from kvfleet.dataplane.kvcache.policy import PolicyAttention, PolicySpec, QuantSpec
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama

from kvfleet.tools.eval_tf import greedy_matches, prefill, score

POLICIES = {
    "baseline": PolicySpec(),
    "int4-kivi-sinks-3": PolicySpec(QuantSpec("int4", group_size=8, residual_tokens=5, sink_tokens=3)),
    "int2-kivi": PolicySpec(QuantSpec("int2", group_size=8, residual_tokens=8, sink_tokens=4)),
    "int3-kivi-pre-rope": PolicySpec(QuantSpec("int3", group_size=8, residual_tokens=4, sink_tokens=2,
                                               keys_pre_rope=True)),
    "int8-per-token": PolicySpec(QuantSpec("int8", "per-token", "per-token", group_size=8, residual_tokens=3)),
    "fp8": PolicySpec(QuantSpec("fp8", group_size=4)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    model, cfg = load_model(d, dtype=torch.float32, device="cpu")
    return model, cfg


def _rope(model):
    def rope(pos):
        cos, sin = model.rotary.cos_sin(pos, torch.float32)
        return cos, sin
    return rope


def _stepwise(model, cfg, spec: PolicySpec, ids: list[int], n_prompt: int) -> torch.Tensor:
    def rope(pos):
        cos, sin = model.rotary.cos_sin(pos, torch.float32)
        return cos[:, 0], sin[:, 0]
    attn = PolicyAttention(spec, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, rope=rope,
                           fp_store_dtype=torch.bfloat16)
    nll = []
    with torch.inference_mode():
        h = model(torch.tensor(ids[:n_prompt]), torch.arange(n_prompt), attn)
        for i in range(n_prompt, len(ids)):
            nll.append(-torch.log_softmax(model.compute_logits(h[-1:])[0], -1)[ids[i]])
            h = model(torch.tensor([ids[i]]), torch.tensor([i]), attn)
    return torch.stack(nll)


@pytest.mark.parametrize("name", list(POLICIES))
def test_one_forward_equals_stepwise_decoding(tiny, name):
    model, cfg = tiny
    rng = random.Random(1)
    ids = [rng.randrange(1, cfg.vocab_size) for _ in range(70)]
    spec = POLICIES[name]
    want = _stepwise(model, cfg, spec, ids, 29)
    got, _ = score(model, spec, prefill(model, ids[:29]), ids[29:], _rope(model))
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()


def test_prompt_compression_equals_one_eviction_after_prefill(tiny):
    """Keydiff at 50% of the prompt: what PolicyAttention keeps after ingesting the prompt, then no
    more eviction (a budget in tokens that the decoded tokens never exceed)."""
    model, cfg = tiny
    rng = random.Random(2)
    ids = [rng.randrange(1, cfg.vocab_size) for _ in range(50)]
    ratio = PolicySpec(eviction=EvictionSpec("keydiff", budget_ratio=0.5, window_tokens=4, sink_tokens=2))
    fixed = PolicySpec(eviction=EvictionSpec("keydiff", budget_tokens=20, window_tokens=4, sink_tokens=2))
    want = _stepwise(model, cfg, fixed, ids[:40] + ids[40:41], 40)  # prompt of 40 -> 20 kept, one step
    got, attn = score(model, ratio, prefill(model, ids[:40]), ids[40:50], _rope(model))
    assert attn.kept_prompt_rows() == 20
    assert torch.allclose(got[:1], want, atol=2e-4)
    base, _ = score(model, PolicySpec(), prefill(model, ids[:40]), ids[40:50], _rope(model))
    assert not torch.allclose(got[1:], base[1:])


def test_greedy_matches_is_greedy_decoding(tiny):
    model, cfg = tiny
    prompt = list(range(5, 40))
    pre = prefill(model, prompt)
    out, ids = [], list(prompt)
    with torch.inference_mode():
        for _ in range(4):
            ids.append(int(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                                      _Dense())[-1:])[0].argmax()))
    out = ids[len(prompt):]
    assert greedy_matches(model, PolicySpec(), pre, out, _rope(model), fp_store=None)
    assert not greedy_matches(model, PolicySpec(), pre, out[:-1] + [(out[-1] + 1) % cfg.vocab_size],
                              _rope(model), fp_store=None)


def test_prefill_over_a_recorded_prefix_equals_a_whole_prefill(tiny):
    model, _ = tiny
    ids = list(range(3, 60))
    whole = prefill(model, ids)
    part = prefill(model, ids, prefix=prefill(model, ids[:30]))
    assert torch.allclose(whole.logits, part.logits, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole.k, part.k, strict=True))


class _Dense:
    def attend(self, layer, q, k, v):
        from kvfleet.dataplane.model.attention import causal_attention
        return causal_attention(q, k, v, q_offset=0)


def test_eval_cache_teacher_forced_end_to_end_and_resume(tmp_path, capsys):
    import json

    from kvfleet.tools import eval_cache

    d = write_tiny_llama(tmp_path / "tiny")
    pol = tmp_path / "p.yaml"
    pol.write_text("metadata: {name: int2-kivi}\nspec:\n  quantization: {dtype: int2, groupSize: 8, residualTokens: 8, "
                   "sinkTokens: 4}\n---\nmetadata: {name: int4-keydiff}\nspec:\n  quantization: {dtype: int4, "
                   "groupSize: 8}\n  eviction: {policy: keydiff, budgetRatio: 0.5, windowTokens: 8}\n")
    args = ["--model", str(d), "--policy", str(pol), "--out", str(tmp_path / "out"), "--ppl-seqs", "64:2,128:1",
            "--passkey-lengths", "96", "--passkey-trials", "2", "--multifact-haystacks", "1",
            "--multifact-length", "160", "--bytes-at", "64"]
    assert eval_cache.main(args) == 0
    err = capsys.readouterr().err
    assert "[eval-cache 1/" in err and "min left" in err
    report = json.loads((tmp_path / "out" / "eval-cache.json").read_text())
    rows = {r["policy"]: r for r in report["results"]}
    assert list(rows) == ["baseline", "int2-kivi", "int4-keydiff"]
    assert rows["baseline"]["ppl_delta_pct"]["all"][0] == 0.0 and rows["baseline"]["within_bar"]
    assert rows["int2-kivi"]["scored_tokens"] == 2 * (31 + 31 + 63)  # two texts, second halves minus the first
    lo, hi = rows["int2-kivi"]["ppl_delta_pct"]["all"][1:]
    assert lo <= rows["int2-kivi"]["ppl_delta_pct"]["all"][0] <= hi
    assert rows["int4-keydiff"]["prompt_kept"] == pytest.approx(0.5, abs=0.1)
    assert rows["int4-keydiff"]["engine_bytes_per_token"] is not None
    assert set(rows["int2-kivi"]["accuracy"]) == {"passkey@96", "multifact@160"}
    assert rows["int2-kivi"]["accuracy"]["multifact@160"][3] == 5
    # a rerun finds everything in the cache
    assert eval_cache.main(args) == 0
    assert " ran;" not in capsys.readouterr().err


def test_kv_bytes_evaluator_and_engine_agree_up_to_lanes_and_block_copies(tiny):
    """Both count scales: the engine adds its lane (sinks, residual ring, sink stash) and, when a key
    group spans two blocks, one copy of the group's scales per block."""
    from kvfleet.dataplane.config import CachePolicyConfig
    from kvfleet.dataplane.kvcache.build import kv_storage_spec

    from kvfleet.tools.eval_quality import kv_bytes

    _, cfg = tiny
    n = 512
    base_eval, base_eng, _ = kv_bytes(PolicySpec(), cfg, n)
    assert base_eval == base_eng == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    spec = POLICIES["int2-kivi"]
    ev, eng, why = kv_bytes(spec, cfg, n)
    assert why == "" and ev < base_eval / 2
    cp = CachePolicyConfig("int2", "int2", group_size=8, residual_tokens=8, quant_sink_tokens=4)
    ks = kv_storage_spec(cp, cfg.num_hidden_layers, 16, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16)
    assert eng == (n // 16 * ks.bytes_per_block + ks.lane_bytes) / n
    assert 1.0 <= eng / ev < 1.3
    _, none, refused = kv_bytes(PolicySpec(QuantSpec("int4", "per-channel", group_size=8),
                                           EvictionSpec("keydiff", budget_ratio=0.5)), cfg, n)
    assert none is None and refused
