"""LookaheadKV in the paged engine (`PagedEvictor.compress_prompt`): the evaluator's tokens, one kept set
per layer and kv head, compressed once, blocks freed."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import greedy, make_engine, random_prompt
from kvfleet.dataplane.config import CachePolicyConfig, ConfigError
from kvfleet.dataplane.engine.api import GenerationRequest
from kvfleet.dataplane.kvcache.eviction import pool_rows, protected_mask, select_keep
from kvfleet.dataplane.kvcache.lookahead import LookaheadConfig, LookaheadKV
from kvfleet.dataplane.kvcache.policy import PolicySpec

from kvfleet.tools.eval_tf import greedy_matches, prefill, score

BS = 4
QUANT = {
    "exact": {},
    "int4-rotated-keys-lanes": dict(key_quantization="int4", value_quantization="int4", group_size=8,
                                    residual_tokens=8, quant_sink_tokens=2, rotate_keys=True),
    "int8-per-token": dict(key_quantization="int8", value_quantization="int8", group_size=8),
    # KIVI: keys per-channel in groups of 8 tokens (a group spans two blocks of 4) or of 4 (two per block of 8):
    # whole groups are kept, their scales move with them
    "int4-kivi-lanes-groups-span-blocks": dict(key_quantization="int4", value_quantization="int4",
                                               key_granularity="per-channel", group_size=8, residual_tokens=8,
                                               quant_sink_tokens=2),
    "int8-kivi-two-groups-per-block": dict(key_quantization="int8", value_quantization="int8",
                                           key_granularity="per-channel", group_size=4, residual_tokens=4,
                                           quant_sink_tokens=2, block_size=8),
}


@pytest.fixture(scope="module")
def module(tiny, tmp_path_factory):
    """An untrained module with a non-zero q/k/v update (the path, not the training, is under test)."""
    _, cfg, _ = tiny
    mod = LookaheadKV(cfg, LookaheadConfig(num_tokens=4, rank=4), seed=1)
    with torch.no_grad():
        mod.lora_b.copy_(torch.randn(mod.lora_b.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    d = tmp_path_factory.mktemp("lookahead")
    mod.save(d, {"recipe": "random, for tests"})
    return d, LookaheadKV.load(d, cfg)


def _cp(module_dir, ratio=0.5, **quant) -> CachePolicyConfig:
    return CachePolicyConfig(eviction="lookahead", eviction_budget_ratio=ratio, eviction_window_tokens=8,
                             eviction_sink_tokens=2, pooling_kernel=3, lookahead_dir=str(module_dir), **quant)


@pytest.mark.parametrize("n", [61, 58])  # 58: a last group of 2 rows, inside the first of its two blocks
@pytest.mark.parametrize("quant", list(QUANT))
def test_engine_emits_the_tokens_the_evaluator_scores(tiny, module, quant, n):
    """The teacher-forced evaluator (per layer/head masks over the prompt) predicts every token the
    engine (per layer/head compaction) emits, for an exact cache and for quantized ones."""
    model, mc, _ = tiny
    d, mod = module
    quant_kw = dict(QUANT[quant])
    block_size = quant_kw.pop("block_size", BS)
    cp = _cp(d, **quant_kw)
    prompt = random_prompt(mc.vocab_size, n, seed=5)
    engine = make_engine(model, mc, cp, block_size=block_size)
    got = engine.generate([prompt], greedy(20))[0].new_token_ids
    st = engine.eviction_stats()
    spec = PolicySpec.from_config(cp)
    rope = lambda p: model.rotary.cos_sin(p, torch.float32)  # noqa: E731
    scorer = lambda p: mod.mass(model, p.k, p.v)  # noqa: E731
    assert greedy_matches(model, spec, prefill(model, prompt), got, rope, fp_store=None, scorer=scorer)
    _, attn = score(model, spec, prefill(model, prompt), got, rope, fp_store=None, scorer=scorer)
    kept = {int(n) for m in attn.keep for n in m.sum(1)}  # rows each (layer, kv head) kept of the prompt
    assert st.compactions == 1 and kept == {n - st.tokens_evicted} and n // 2 - 6 <= n - st.tokens_evicted <= 40
    if spec.eviction.chunk_tokens:  # whole groups
        assert st.tokens_evicted % spec.eviction.chunk_tokens == 0
    # and the path is not a no-op: the plain cache decodes otherwise
    assert got != make_engine(model, mc, block_size=BS).generate([prompt], greedy(20))[0].new_token_ids


def test_each_layer_and_head_keeps_its_own_best_rows(tiny, module):
    model, mc, _ = tiny
    d, mod = module
    engine = make_engine(model, mc, _cp(d), block_size=BS)
    prompt = random_prompt(mc.vocab_size, 45, seed=7)
    engine.add_request(GenerationRequest("a", prompt, greedy(12)))
    seq, bm = engine.seqs["a"], engine.scheduler.bm
    engine.step()  # the prompt (one prefill) and its compression
    p, hkv = len(prompt), mc.num_key_value_heads
    before = prefill(model, prompt)  # the prompt's keys as computed (an exact cache stores them so)
    pos = torch.arange(p)
    prot = protected_mask(pos, p, 2, 8)[:, None].expand(p, hkv)
    mass = mod.mass(model, before.k, before.v)
    k = seq.num_kv_slots
    assert k == 23 and seq.num_evicted == p - 23 and len(seq.block_table) == -(-k // BS)
    table = torch.tensor(seq.block_table)
    sets = []
    for layer in range(mc.num_hidden_layers):
        keep = select_keep(pool_rows(mass[layer], 3), prot, 23)  # [23, Hkv]
        stored = engine.worker.kv.gather(layer, table)[0][:k]  # [k, Hkv, D]
        for h in range(hkv):
            torch.testing.assert_close(stored[:, h], before.k[layer][keep[:, h], h], rtol=0, atol=1e-6)
            sets.append(tuple(keep[:, h].tolist()))
    assert len(set(sets)) > 1  # the heads really keep different rows
    while engine.has_unfinished():  # decoded tokens are all kept: no second compaction
        engine.step()
    assert engine.eviction_stats().compactions == 1
    assert bm.num_used_blocks == 0
    bm.check_invariants()


def test_a_prompt_within_the_protected_rows_is_left_whole(tiny, module):
    model, mc, _ = tiny
    d, _ = module
    engine = make_engine(model, mc, _cp(d, ratio=0.9), block_size=BS)
    engine.generate([random_prompt(mc.vocab_size, 9, seed=1)], greedy(30))
    assert engine.eviction_stats().compactions == 0  # 2 sinks + an 8-token window cover 9: nothing to drop
    # (that a compressed prompt is never compressed again: test_each_layer_and_head_keeps_its_own_best_rows)


def test_config_refuses_what_lookahead_cannot_serve(tmp_path):
    with pytest.raises(ConfigError, match="lookahead_dir"):
        CachePolicyConfig(eviction="lookahead", eviction_budget_ratio=0.5)
    with pytest.raises(ConfigError, match="lookahead_dir"):
        CachePolicyConfig(lookahead_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="keys_pre_rope"):
        _cp(tmp_path, key_quantization="int4", value_quantization="int4", keys_pre_rope=True).check_servable()
    with pytest.raises(ConfigError, match="rotate_keys"):
        CachePolicyConfig(key_quantization="fp8", value_quantization="fp8", rotate_keys=True)
    _cp(tmp_path, **QUANT["int4-rotated-keys-lanes"]).check_servable()  # the served combination
