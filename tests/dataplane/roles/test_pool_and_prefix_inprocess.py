"""The pool and prefix-aware routing over in-process roles: real engines, the in-process transport and
pool client, static discovery (no processes: the loopback-process versions are in test_pool_process.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.roles.disaggregated import DisaggregatedEngine, RouterPolicy
from kvfleet.dataplane.roles.discovery import Endpoint, StaticDiscovery
from kvfleet.dataplane.roles.mempool import MempoolService
from kvfleet.dataplane.roles.mempool_store import PoolStore
from kvfleet.dataplane.roles.pool_client import InProcessPoolClient
from kvfleet.dataplane.roles.pool_use import PoolAccess
from kvfleet.dataplane.roles.routing import RoutingPolicy
from kvfleet.dataplane.roles.services import DecodeService, PrefillService
from kvfleet.dataplane.roles.transport import InProcessTransport
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb

BS = 4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")


def _engine(tiny, blocks: int = 96) -> LLMEngine:
    cfg = EngineConfig(model_dir="unused", variant="v", block_size=BS, num_kv_blocks=blocks, max_num_seqs=4)
    return LLMEngine(tiny[0], tiny[1], cfg)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


class Fleet:
    """Two prefill engines, one decode engine, one pool, a router over them."""

    def __init__(self, tiny, mode: str, pool: bool = True) -> None:
        self.transport = InProcessTransport()
        self.pool_client = InProcessPoolClient({"pool": MempoolService(PoolStore(capacity_bytes=64 << 20))})
        self.engines = {n: AsyncLLMEngine(_engine(tiny)) for n in ("p1", "p2", "d")}
        self.access = {n: PoolAccess(e, self.pool_client, "fam") for n, e in self.engines.items()}
        self.transport.services = {
            "p1": PrefillService(self.engines["p1"], self.transport, pool=self.access["p1"]),
            "p2": PrefillService(self.engines["p2"], self.transport, pool=self.access["p2"]),
            "d": DecodeService(self.engines["d"], pool=self.access["d"])}
        eps = [Endpoint("p1", "p1", "prefill", "v"), Endpoint("p2", "p2", "prefill", "v"),
               Endpoint("d", "d", "decode", "v")] + ([Endpoint("pool-0", "pool", "mempool", "")] if pool else [])
        self.router = DisaggregatedEngine(StaticDiscovery(eps), ["v"], RouterPolicy(stats_interval_s=0.01),
                                          self.transport, routing=RoutingPolicy(mode=mode))

    async def run(self, rid: str, prompt: list[int], n: int = 6) -> list[int]:
        req = GenerationRequest(rid, prompt, greedy(n), variant="v")
        await self.router.admit(req)
        toks: list[int] = []
        async for out in self.router.generate(req):
            toks += out.new_token_ids
        return toks

    async def stats(self, name: str) -> pb.RoleStats:
        return await self.transport.stats(name, "decode" if name == "d" else "prefill")

    def prefill_calls(self) -> list[str]:
        return [addr for method, addr in self.transport.calls if method == "Prefill"]

    async def close(self) -> None:
        for a in self.access.values():
            await a.drain()
        await self.router.shutdown()
        for e in self.engines.values():
            await e.shutdown()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (n,), generator=g).tolist()


def test_a_second_prefill_pod_takes_the_prefix_from_the_pool(tiny):
    system = _prompt(1, 48)
    q1, q2 = system + _prompt(2, 6), system + _prompt(3, 6)
    cold = _engine(tiny).generate([q2], greedy(6))[0].new_token_ids

    async def go():
        fleet = Fleet(tiny, mode="round-robin")
        await fleet.router.start()
        await fleet.run("a", q1)
        await fleet.access["p1"].drain()  # the write-behind put has landed
        got = await fleet.run("b", q2)
        assert fleet.prefill_calls() == ["p1", "p2"]  # round-robin: the second prompt went to the other pod
        p2 = await fleet.stats("p2")
        assert p2.pool_blocks_fetched == len(system) // BS
        assert p2.prompt_tokens_computed == len(q2) - len(system)  # only the question was computed
        assert (await fleet.stats("p1")).pool_blocks_offered >= len(system) // BS
        await fleet.close()
        return got

    assert _run(go()) == cold


def test_requests_succeed_with_the_pool_down(tiny):
    system = _prompt(4, 40)
    cold = _engine(tiny).generate([system + [7, 8]], greedy(6))[0].new_token_ids

    async def go():
        fleet = Fleet(tiny, mode="round-robin")
        fleet.pool_client.down.add("pool")
        await fleet.router.start()
        assert await fleet.run("a", system + [5, 6]) and await fleet.run("b", system + [7, 8]) == cold
        s = await fleet.stats("p2")
        assert s.pool_blocks_fetched == 0 and s.pool_errors >= 1
        await fleet.close()

    _run(go())


def test_prefix_routing_sends_a_prompt_to_the_pod_holding_it_and_spills_when_saturated(tiny):
    systems = {k: _prompt(10 + i, 40) for i, k in enumerate("AB")}

    async def go():
        fleet = Fleet(tiny, mode="prefix", pool=False)  # no pool: the pods' own prefix caches only
        await fleet.router.start()
        p1 = Endpoint("p1", "p1", "prefill", "v")
        await fleet.run("A0", systems["A"] + [1, 2])  # idle fleet: the tie goes to p1
        fleet.router._load(p1).in_flight += 1  # p1 is busy when B first arrives: B starts on p2
        await fleet.run("B0", systems["B"] + [1, 2])
        fleet.router._load(p1).in_flight -= 1
        index = fleet.router.picker.index
        for _ in range(100):  # the pods' KV events reach the router's index
            if index.leading_blocks("p2", index.prompt_hashes("p2", "v", systems["B"] + [0])) == 10:
                break
            await asyncio.sleep(0.02)
        before = {n: (await fleet.stats(n)).prefix_cache_hit_tokens for n in ("p1", "p2")}
        for i in range(3):
            await fleet.run(f"A{i + 1}", systems["A"] + [3 + i, 9])
            await fleet.run(f"B{i + 1}", systems["B"] + [3 + i, 9])
        assert fleet.prefill_calls()[2:] == ["p1", "p2"] * 3  # each prompt to the pod that holds it
        after = {n: (await fleet.stats(n)).prefix_cache_hit_tokens for n in ("p1", "p2")}
        assert after["p1"] - before["p1"] == 3 * 40 and after["p2"] - before["p2"] == 3 * 40
        assert fleet.router.picker.hit_rate > 0.7
        fleet.router._load(p1).in_flight += 4  # p1 saturated (4 seats): A spills to p2
        await fleet.run("A9", systems["A"] + [42, 43])
        assert fleet.prefill_calls()[-1] == "p2"
        await fleet.close()

    _run(go())
