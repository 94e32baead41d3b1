"""Pieces of the server without HTTP: stop-string matching and the FakeEngine's contract."""

from __future__ import annotations

import asyncio

import pytest
from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
from kvfleet.dataplane.engine.fake import FakeEngine
from kvfleet.dataplane.server.textstream import StopStringMatcher


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopStringMatcher(["\n\n", "END"])
    assert m.push("Hello\n") == ("Hello", False)
    assert m.push("E") == ("\n", False)  # "\nE" cannot start "\n\n"; "E" may start "END"
    assert m.push("x") == ("Ex", False)
    assert m.push("EN") == ("", False)
    assert m.push("D and more") == ("", True)
    assert m.released_text == "Hello\nEx" and m.flush() == ""


def test_stop_matcher_across_pieces_and_flush():
    m = StopStringMatcher(["abc"])
    assert m.push("xxab") == ("xx", False)
    assert m.push("x") == ("abx", False)
    assert m.push("ab") == ("", False)
    assert m.flush() == "ab"
    m = StopStringMatcher(["bb", "abbc"])
    assert m.push("abb") == ("a", True)  # the earliest stop wins


def test_stop_matcher_without_stops_passes_everything():
    m = StopStringMatcher([])
    assert m.push("anything") == ("anything", False)


async def _run(engine, req):
    outs = [o async for o in engine.generate(req)]
    return [t for o in outs for t in o.new_token_ids], outs[-1]


def test_fake_engine_echoes_and_respects_limits():
    engine = FakeEngine(max_model_len=16, eos_token_ids=[99])

    async def main():
        toks, last = await _run(engine, GenerationRequest("a", [5, 6, 7], SamplingParams(max_tokens=5)))
        assert toks == [5, 6, 7, 5, 6] and last.finish_reason == "length"
        toks, last = await _run(engine, GenerationRequest("b", [5, 99, 7], SamplingParams(max_tokens=5)))
        assert toks == [5, 99] and last.finish_reason == "stop"
        toks, last = await _run(engine, GenerationRequest("c", [5, 99], SamplingParams(max_tokens=5,
                                                                                      ignore_eos=True)))
        assert len(toks) == 5 and last.finish_reason == "length"
        toks, last = await _run(engine, GenerationRequest("d", [1] * 10, SamplingParams(max_tokens=100)))
        assert len(toks) == 6 and last.finish_reason == "length"  # max_model_len
        with pytest.raises(ValueError):
            await _run(engine, GenerationRequest("e", [1] * 16))
        assert engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0

    asyncio.run(main())


def test_fake_engine_abort_cancel_and_waiting():
    engine = FakeEngine(max_num_seqs=1, token_delay_s=0.01, block_size=4)

    async def main():
        long = SamplingParams(max_tokens=1000)
        first = asyncio.create_task(_run(engine, GenerationRequest("a", [1, 2, 3, 4, 5], long)))
        second = asyncio.create_task(_run(engine, GenerationRequest("b", [1, 2], long)))
        await asyncio.sleep(0.05)
        s = engine.stats()
        assert (s.num_running, s.num_waiting) == (1, 1) and s.kv_blocks_used >= 2
        await engine.abort("b")  # aborted while waiting
        _, last = await second
        assert last.finish_reason == "abort"
        first.cancel()  # a consumer going away frees its request
        with pytest.raises(asyncio.CancelledError):
            await first
        assert engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0
        assert engine.num_aborted == 2
        await engine.abort("unknown")  # a no-op

    asyncio.run(main())


def test_fake_engine_counts_prefix_hits():
    engine = FakeEngine(block_size=4)

    async def main():
        _, last = await _run(engine, GenerationRequest("a", list(range(10)), SamplingParams(max_tokens=1)))
        assert last.num_cached_prompt_tokens == 0
        _, last = await _run(engine, GenerationRequest("b", list(range(9)) + [42], SamplingParams(max_tokens=1)))
        assert last.num_cached_prompt_tokens == 8
        assert engine.stats().prefix_cache_hit_tokens == 8

    asyncio.run(main())


def test_fake_engine_ignore_eos_spares_only_eos_like_the_real_engine():
    """The fake honours the engine's contract: ignore_eos never disables the request's stop ids."""
    import asyncio

    from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
    from kvfleet.dataplane.engine.fake import FakeEngine

    async def run() -> list:
        engine = FakeEngine(eos_token_ids=[6])
        sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(7,))
        return [out async for out in engine.generate(GenerationRequest("r", [5, 6, 7, 8], sampling))]

    outs = asyncio.run(run())
    tokens = [t for o in outs for t in o.new_token_ids]
    assert outs[-1].finish_reason == "stop" and tokens[-1] == 7 and 6 in tokens
