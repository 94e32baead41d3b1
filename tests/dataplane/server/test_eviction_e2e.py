"""End to end: the OpenAI server over the real engine under a token-eviction cache policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvfleet.dataplane.model.tokenizer import Tokenizer
from server_testlib import run_server


def _evicting_engine(tiny_dir: Path):
    from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
    from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine

    cp = CachePolicyConfig(eviction="streaming-llm", eviction_budget_tokens=24, eviction_window_tokens=12,
                           eviction_sink_tokens=4)
    return AsyncLLMEngine.from_config(EngineConfig(model_dir=str(tiny_dir), dtype="float32", device="cpu",
                                                   max_num_seqs=4, num_kv_blocks=64, block_size=4,
                                                   cache_policy=cp))


@pytest.fixture(scope="module")
def evicting_server(tiny_dir: Path, tokenizer: Tokenizer):
    live, stop = run_server(lambda: _evicting_engine(tiny_dir), tokenizer, "engine")
    yield live
    stop()


def test_completion_longer_than_the_budget(evicting_server):
    import openai

    with openai.OpenAI(base_url=evicting_server.base_url + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        r = c.completions.create(model="tiny", prompt="hello world, this is a prompt", max_tokens=64,
                                 temperature=0.0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 64
    assert r.choices[0].finish_reason == "length"
    llm = evicting_server.engine.engine  # the LLMEngine inside AsyncLLMEngine
    st = llm.eviction_stats()
    # every computed token beyond the kept ones was evicted (the last sampled token is never computed,
    # and the finishing step does not compact); over 24 the engine keeps 24 - block_size (hysteresis)
    kept = 64 + r.usage.prompt_tokens - 2 - st.tokens_evicted
    assert st.blocks_freed > 0 and 20 <= kept <= 24
    s = evicting_server.engine.stats()
    assert s.kv_blocks_used == 0 and s.generation_tokens == 64


@pytest.fixture(scope="module")
def lookahead_server(tiny_dir: Path, tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """int4 keys rotated + values per-token with full-precision lanes, LookaheadKV keeping 50% of prompts."""
    from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
    from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine
    from kvfleet.dataplane.kvcache.lookahead import LookaheadConfig, LookaheadKV
    from kvfleet.dataplane.model.config import ModelConfig

    module_dir = tmp_path_factory.mktemp("lookahead")
    LookaheadKV(ModelConfig.from_dir(tiny_dir), LookaheadConfig(num_tokens=4, rank=4)).save(module_dir, {})
    cp = CachePolicyConfig(key_quantization="int4", value_quantization="int4", group_size=8, residual_tokens=8,
                           quant_sink_tokens=2, rotate_keys=True, eviction="lookahead", eviction_budget_ratio=0.5,
                           eviction_window_tokens=8, eviction_sink_tokens=2, pooling_kernel=3,
                           lookahead_dir=str(module_dir))
    cfg = EngineConfig(model_dir=str(tiny_dir), dtype="float32", device="cpu", max_num_seqs=4, num_kv_blocks=64,
                       block_size=4, cache_policy=cp)
    live, stop = run_server(lambda: AsyncLLMEngine.from_config(cfg), tokenizer, "engine")
    yield live
    stop()


def test_lookahead_compresses_each_prompt_once_over_http(lookahead_server):
    import openai

    prompt = "the quick brown fox jumps over the lazy dog " * 4
    with openai.OpenAI(base_url=lookahead_server.base_url + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as c:
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0.0,
                                 extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    st = lookahead_server.engine.engine.eviction_stats()
    p = r.usage.prompt_tokens
    assert st.compactions == 1 and st.tokens_evicted == p - -(-p // 2)  # half the prompt; decoded tokens kept
    assert lookahead_server.engine.stats().kv_blocks_used == 0
