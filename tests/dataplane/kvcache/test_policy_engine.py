"""The paged engine applies a quantized CachePolicy: more blocks per byte, greedy output close to fp."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.kvcache.paged import PagedKVCache
from kvfleet.dataplane.kvcache.paged_quant import PagedQuantKV
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _engine(tiny: Path, cp: CachePolicyConfig) -> LLMEngine:
    model, mc = load_model(tiny, dtype="float32")
    cfg = EngineConfig(model_dir=str(tiny), block_size=8, kv_cache_bytes=1 << 20, max_num_seqs=4,
                       max_model_len=256, cache_policy=cp)
    return LLMEngine(model, mc, cfg, "cpu", torch.float32)


def test_quantized_policy_gives_more_blocks_and_close_greedy_output(tiny: Path) -> None:
    fp = _engine(tiny, CachePolicyConfig())
    q8 = _engine(tiny, CachePolicyConfig(key_quantization="int8", value_quantization="int8", group_size=8))
    q4 = _engine(tiny, CachePolicyConfig(key_quantization="int4", value_quantization="int4", group_size=8))
    assert isinstance(fp.runner.kv, PagedKVCache) and isinstance(q8.runner.kv, PagedQuantKV)
    n_fp, n8, n4 = (e.stats().kv_blocks_total for e in (fp, q8, q4))
    assert n8 > 2.5 * n_fp and n4 > n8  # fp32 -> int8 (+ fp16 scales per 8 channels) -> int4
    prompts = [[5, 17, 33, 2, 90, 41, 7, 7, 12, 64, 3, 9], [100, 101, 102, 103, 104]]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.new_token_ids for o in fp.generate(prompts, sp)]
    got = [o.new_token_ids for o in q8.generate(prompts, sp)]
    assert all(len(g) == 12 for g in got)
    agree = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True))
    assert agree >= 20  # int8 KV rarely flips a greedy token of a random tiny model


def test_engine_rejects_an_impossible_policy(tiny: Path) -> None:
    with pytest.raises(ValueError, match="must divide head_dim"):
        _engine(tiny, CachePolicyConfig(key_quantization="int4", value_quantization="int4",
                                        key_granularity="per-token", group_size=12))
