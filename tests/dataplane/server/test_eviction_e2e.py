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
