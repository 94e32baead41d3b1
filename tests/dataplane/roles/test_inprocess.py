"""The router's logic over in-process roles: real engines, the in-process transport, static discovery.

No processes and no sockets: `InProcessTransport` hands each call to a `PrefillService` / `DecodeService`
object, so admission, picking, retries and the KV hand-off are checked fast and deterministically.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import EngineOverloaded, GenerationRequest, SamplingParams
from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.roles.disaggregated import DisaggregatedEngine, RouterPolicy
from kvfleet.dataplane.roles.discovery import Endpoint, StaticDiscovery
from kvfleet.dataplane.roles.services import DecodeService, PrefillService
from kvfleet.dataplane.roles.transport import InProcessTransport

PROMPT = list(range(5, 40))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")


def _engine(tiny, **kw) -> LLMEngine:
    cfg = EngineConfig(**{"model_dir": "unused", "variant": "v", "block_size": 4, "num_kv_blocks": 64,
                          "max_num_seqs": 4, **kw})
    return LLMEngine(tiny[0], tiny[1], cfg)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


class Fleet:
    """One prefill and two decode engines behind an in-process transport, and a router engine over them."""

    def __init__(self, tiny, decode_blocks: tuple[int, int] = (64, 64), **policy) -> None:
        self.transport = InProcessTransport()
        self.engines = {"p": AsyncLLMEngine(_engine(tiny)),
                        "d1": AsyncLLMEngine(_engine(tiny, num_kv_blocks=decode_blocks[0])),
                        "d2": AsyncLLMEngine(_engine(tiny, num_kv_blocks=decode_blocks[1]))}
        self.transport.services = {"p": PrefillService(self.engines["p"], self.transport),
                                   "d1": DecodeService(self.engines["d1"]), "d2": DecodeService(self.engines["d2"])}
        self.discovery = StaticDiscovery([Endpoint("p", "p", "prefill", "v"), Endpoint("d1", "d1", "decode", "v"),
                                          Endpoint("d2", "d2", "decode", "v")])
        self.router = DisaggregatedEngine(self.discovery, ["v"], RouterPolicy(
            sheddable=frozenset({"batch"}), queue_timeout_s=0.2, stats_interval_s=0.01, **policy), self.transport)

    async def run(self, req: GenerationRequest) -> list[int]:
        await self.router.admit(req)
        toks: list[int] = []
        async for out in self.router.generate(req):
            toks += out.new_token_ids
        return toks

    async def close(self) -> None:
        await self.router.shutdown()
        for e in self.engines.values():
            await e.shutdown()

    def used(self, name: str) -> int:
        return self.engines[name].engine.scheduler.bm.num_used_blocks


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_same_tokens_as_one_engine_and_the_roomiest_decode_is_picked(tiny):
    want = _engine(tiny).generate([PROMPT], greedy(12))[0].new_token_ids

    async def go():
        fleet = Fleet(tiny, decode_blocks=(16, 64))
        await fleet.router.start()
        await asyncio.sleep(0.05)  # one stats poll: d2 has the most free KV
        got = await fleet.run(GenerationRequest("r1", PROMPT, greedy(12), variant="v"))
        assert ("PushKV", "d2") in fleet.transport.calls and ("Generate", "d2") in fleet.transport.calls
        assert fleet.used("d2") == 0 and fleet.used("d1") == 0 and fleet.used("p") == 0  # everything freed
        await fleet.close()
        return got

    assert _run(go()) == want


def test_no_room_sheds_batch_and_frees_nothing_twice(tiny):
    async def go():
        fleet = Fleet(tiny, decode_blocks=(12, 12))
        for d in ("d1", "d2"):  # other requests hold 8 of each pod's 12 blocks: a 35-token prompt fits nowhere
            assert fleet.engines[d].engine.reserve("other", 30, 1)
        with pytest.raises(EngineOverloaded):
            await fleet.router.admit(GenerationRequest("r", PROMPT, greedy(4), variant="v", slo_class="batch"))
        with pytest.raises(EngineOverloaded):  # a critical class waits (queue_timeout_s), then is refused too
            await fleet.router.admit(GenerationRequest("r2", PROMPT, greedy(4), variant="v"))
        assert fleet.router.counters["shed"] == 2 and fleet.used("d1") == fleet.used("d2") == 8  # nothing leaked
        await fleet.close()

    _run(go())


def test_a_decode_pod_down_before_streaming_is_replaced_by_one_that_recomputes(tiny):
    want = _engine(tiny).generate([PROMPT], greedy(10))[0].new_token_ids

    async def go():
        fleet = Fleet(tiny)
        req = GenerationRequest("r", PROMPT, greedy(10), variant="v")
        await fleet.router.admit(req)
        reserved = fleet.router._reserved["r"].name
        fleet.transport.down.add(reserved)  # dies after the reservation and the push
        toks = []
        async for out in fleet.router.generate(req):
            toks += out.new_token_ids
        other = "d1" if reserved == "d2" else "d2"
        assert fleet.router.counters["decode_retries"] == 1 and fleet.router.counters["recomputed"] == 1
        assert fleet.used(other) == 0
        await fleet.close()
        return toks

    assert _run(go()) == want


def test_a_decode_pod_dying_mid_stream_ends_with_an_error_never_wrong_tokens(tiny):
    want = _engine(tiny).generate([PROMPT], greedy(30))[0].new_token_ids

    async def go():
        fleet = Fleet(tiny)
        req = GenerationRequest("r", PROMPT, greedy(30), variant="v")
        await fleet.router.admit(req)
        name = fleet.router._reserved["r"].name
        toks: list[int] = []
        with pytest.raises(RuntimeError, match="failed mid-stream"):
            async for out in fleet.router.generate(req):
                toks += out.new_token_ids
                if len(toks) >= 5:
                    fleet.transport.down.add(name)
        assert toks == want[:len(toks)] and len(toks) < 30
        await asyncio.sleep(0.1)  # the cancelled stream aborts the request on the dead pod's engine
        assert fleet.used(name) == 0 and fleet.used("p") == 0
        await fleet.close()

    _run(go())


def test_a_prefill_pod_that_fails_is_skipped(tiny):
    async def go():
        fleet = Fleet(tiny)
        fleet.transport.services["a"] = fleet.transport.services["p"]
        fleet.discovery.add(Endpoint("a", "a", "prefill", "v"))
        fleet.transport.down.add("a")  # picked first (name order when loads tie), and unreachable
        toks = await fleet.run(GenerationRequest("r", PROMPT, greedy(6), variant="v"))
        assert ("Prefill", "a") in fleet.transport.calls and ("Prefill", "p") in fleet.transport.calls
        assert len(toks) == 6 and fleet.router.counters["prefill_retries"] == 1
        await fleet.close()

    _run(go())


def test_a_reservation_outlives_a_long_prefill_queue(tiny):
    """The router asks decode to hold the room as long as a prefill may take: a queued prefill never finds
    its reservation expired (the benchmark saw decode recompute prompts whose KV had arrived)."""
    import time as _time

    async def go():
        fleet = Fleet(tiny)
        req = GenerationRequest("r", PROMPT, greedy(4), variant="v")
        await fleet.router.admit(req)
        name = fleet.router._reserved["r"].name
        eng = fleet.engines[name].engine
        assert not eng.reservations.expire(eng, now=_time.monotonic() + 300)  # 5 min of queueing: still held
        toks = []
        async for out in fleet.router.generate(req):
            toks += out.new_token_ids
        assert len(toks) == 4 and fleet.router.counters["recomputed"] == 0
        await fleet.close()

    _run(go())
