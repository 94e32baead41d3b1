"""AsyncLLMEngine: concurrent generate, cancellation frees blocks, abort, shutdown."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import AsyncEngine, GenerationRequest, SamplingParams
from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine
from kvfleet.dataplane.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _llm(tiny, **kw):
    model, mc, _ = tiny
    return LLMEngine(model, mc, EngineConfig(model_dir="unused", block_size=4, num_kv_blocks=128, **kw))


def _prompts(vocab, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in lengths]


async def _collect(engine: AsyncEngine, req: GenerationRequest):
    toks, last = [], None
    async for out in engine.generate(req):
        toks += out.new_token_ids
        last = out
    return toks, last


async def _wait_for(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.01)


def test_concurrent_generate_matches_sync(tiny):
    prompts = _prompts(tiny[1].vocab_size, [3, 8, 15, 21, 5], seed=1)
    expected = [o.new_token_ids for o in _llm(tiny).generate(prompts, GREEDY)]

    async def main():
        eng = AsyncLLMEngine(_llm(tiny))
        await eng.start()
        try:
            res = await asyncio.gather(*[
                _collect(eng, GenerationRequest(f"r{i}", p, GREEDY)) for i, p in enumerate(prompts)
            ])
        finally:
            await eng.shutdown()
        return res

    results = asyncio.run(main())
    for (toks, last), exp in zip(results, expected, strict=True):
        assert toks == exp and last.finished and last.finish_reason == "length"


def test_cancelling_consumer_aborts_and_frees_blocks(tiny):
    async def main():
        eng = AsyncLLMEngine(_llm(tiny))
        long = GenerationRequest("long", _prompts(tiny[1].vocab_size, [12], 2)[0],
                                 SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
        seen = []

        async def consume():
            async for out in eng.generate(long):
                seen.append(out)

        task = asyncio.create_task(consume())
        await _wait_for(lambda: len(seen) >= 2)
        assert eng.stats().kv_blocks_used > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(lambda: eng.stats().kv_blocks_used == 0 and eng.stats().num_running == 0)
        # the engine keeps serving after a cancellation
        toks, last = await _collect(eng, GenerationRequest("next", [1, 2, 3], GREEDY))
        assert len(toks) == 10 and last.finished
        await eng.shutdown()
        eng.engine.scheduler.bm.check_invariants()

    asyncio.run(main())


def test_abort_and_shutdown_end_requests_with_abort(tiny):
    async def main():
        eng = AsyncLLMEngine(_llm(tiny))
        sp = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        t1 = asyncio.create_task(_collect(eng, GenerationRequest("a", [5, 6, 7], sp)))
        t2 = asyncio.create_task(_collect(eng, GenerationRequest("b", [8, 9], sp)))
        await _wait_for(lambda: eng.stats().num_running == 2)
        await eng.abort("a")
        _, last_a = await t1
        assert last_a.finished and last_a.finish_reason == "abort"
        await eng.shutdown()
        _, last_b = await t2
        assert last_b.finish_reason == "abort"
        assert eng.stats().kv_blocks_used == 0

    asyncio.run(main())


def test_invalid_requests_raise(tiny):
    async def main():
        eng = AsyncLLMEngine(_llm(tiny))
        with pytest.raises(ValueError):
            await _collect(eng, GenerationRequest("empty", [], GREEDY))
        with pytest.raises(ValueError):
            await _collect(eng, GenerationRequest("huge", [1] * eng.max_model_len, GREEDY))
        await eng.shutdown()

    asyncio.run(main())
