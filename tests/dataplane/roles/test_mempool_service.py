"""The Mempool gRPC service: in process (the fake client) and over a real server on loopback.

Many concurrent clients; malformed, oversized and corrupt calls get their status codes and the
pool goes on serving; a restarted pool is empty and its clients cope.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from kvfleet.dataplane.kvcache.blocks import hash_block
from kvfleet.dataplane.kvcache.keys import checksum
from kvfleet.dataplane.pool_config import PoolConfig
from kvfleet.dataplane.roles import wire
from kvfleet.dataplane.roles.mempool import MempoolService
from kvfleet.dataplane.roles.mempool_store import PoolStore, store_for
from kvfleet.dataplane.roles.pool_client import (
    GrpcPoolClient,
    InProcessPoolClient,
    PoolBlock,
    PoolClient,
    block_from_pb,
    get_request,
    put_messages,
)
from kvfleet.dataplane.roles.transport import CallError
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

FAM, LAYOUT = "smollm2", '{"kind":"PagedKVCache","block_size":4}'


def prompt_blocks(seed: int, n: int, size: int = 256) -> list[PoolBlock]:
    rng = random.Random(seed)
    out, parent = [], None
    for _ in range(n):
        parent = hash_block(parent, [rng.randrange(32000) for _ in range(4)], "base")
        payload = rng.randbytes(size)
        out.append(PoolBlock(parent, payload, checksum(payload)))
    return out


def service(**kw) -> MempoolService:
    return MempoolService(PoolStore(**{"capacity_bytes": 1 << 20, **kw}), block_size_tokens=4, kv_dtype="none")


async def roundtrip(client: PoolClient, address: str) -> None:
    blocks = prompt_blocks(1, 6)
    reply = await client.put(address, FAM, LAYOUT, blocks[:4], slo_class="gold")
    assert (reply.stored, reply.pinned, reply.bytes) == (4, 4, 4 * 256)
    assert await client.get(address, FAM, LAYOUT, [b.block_hash for b in blocks]) == blocks[:4]
    assert await client.lookup(address, FAM, LAYOUT, [b.block_hash for b in blocks]) == 4
    assert await client.get(address, "other", LAYOUT, [b.block_hash for b in blocks]) == []
    s = await client.stats(address)
    assert (s.blocks, s.pinned_blocks, s.hit_keys, s.lookup_keys, s.block_size_tokens) == (4, 4, 4, 12, 4)


def test_in_process_put_get_lookup_stats():
    async def main() -> None:
        client = InProcessPoolClient({"pool-0": service(pin_caps={"gold": 4096})})
        await roundtrip(client, "pool-0")
        with pytest.raises(CallError) as e:
            await client.stats("pool-1")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def pool_service() -> MempoolService:
    return service(pin_caps={"gold": 4096}, max_block_bytes=64 << 10, max_keys=512)


@contextlib.asynccontextmanager
async def serving(svc: MempoolService) -> AsyncIterator[str]:
    """A real gRPC server on a loopback port, in this event loop; yields its address."""
    server, port = await wire.start_grpc([(pb_grpc.add_MempoolServicer_to_server, svc)], "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def test_over_grpc_put_get_lookup_stats():
    async def main() -> None:
        client = GrpcPoolClient()
        async with serving(pool_service()) as address:
            try:
                await roundtrip(client, address)
            finally:
                await client.close()

    asyncio.run(main())


def test_many_concurrent_clients_over_grpc():
    """32 asyncio clients (a channel each) and 8 threads with blocking stubs put and get shared prefixes."""
    svc = pool_service()
    shared = prompt_blocks(7, 8)
    rounds = 20

    def mine(n: int, i: int) -> tuple[list[PoolBlock], str]:
        rng = random.Random(n * 1000 + i)
        return shared[:rng.randint(1, 8)] + prompt_blocks(n * 100 + i, rng.randint(0, 4)), rng.choice(["", "gold"])

    async def async_client(n: int, address: str) -> None:
        client = GrpcPoolClient()
        try:
            for i in range(rounds):
                blocks, cls = mine(n, i)
                await client.put(address, FAM, LAYOUT, blocks, slo_class=cls)
                got = await client.get(address, FAM, LAYOUT, [b.block_hash for b in shared])
                assert got == shared[:len(got)]
        finally:
            await client.close()

    def thread_client(n: int, address: str) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.MempoolStub(ch)
            for i in range(rounds):
                blocks, cls = mine(n, i)
                stub.Put(iter(put_messages(FAM, LAYOUT, blocks, cls)), timeout=30)
                got = [block_from_pb(m) for m in stub.Get(get_request(FAM, LAYOUT, [b.block_hash for b in shared]),
                                                          timeout=30)]
                assert got == shared[:len(got)]

    async def main() -> None:
        async with serving(svc) as address:
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=8) as pool:
                threads = [loop.run_in_executor(pool, thread_client, 100 + t, address) for t in range(8)]
                await asyncio.gather(*(async_client(n, address) for n in range(32)), *threads)

    asyncio.run(main())
    svc.store.check_invariants()
    s = svc.stats()
    assert s.put_requests == 40 * rounds and s.get_requests == 40 * rounds and s.rejected_requests == 0
    assert s.hit_keys > 0


async def _raw_put(stub: pb_grpc.MempoolStub, msgs: list[pb.PoolBlock]) -> pb.PutReply:
    async def stream() -> AsyncIterator[pb.PoolBlock]:
        for m in msgs:
            yield m

    return await stub.Put(stream(), timeout=10)


def _msg(payload: bytes = b"kv" * 8, h: bytes = bytes(range(16)), crc: int | None = None, **head) -> pb.PoolBlock:
    return pb.PoolBlock(block_hash=h, payload=payload, crc32=checksum(payload) if crc is None else crc, **head)


NS = {"family": FAM, "layout": LAYOUT}


@pytest.mark.parametrize("what, msgs, code", [
    ("no family", [_msg(layout=LAYOUT)], grpc.StatusCode.INVALID_ARGUMENT),
    ("empty put", [], grpc.StatusCode.INVALID_ARGUMENT),
    ("short hash", [_msg(h=b"abc", **NS)], grpc.StatusCode.INVALID_ARGUMENT),
    ("empty payload", [_msg(payload=b"", **NS)], grpc.StatusCode.INVALID_ARGUMENT),
    ("block too large", [_msg(payload=bytes(65 << 10), **NS)], grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("too many blocks", [_msg(**NS)] + [_msg(h=i.to_bytes(16, "little")) for i in range(600)],
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("corrupt", [_msg(**NS), _msg(h=bytes(16), crc=1)], grpc.StatusCode.DATA_LOSS),
])
def test_bad_puts_get_status_codes_and_the_pool_keeps_serving(what, msgs, code):
    svc = pool_service()

    async def main() -> None:
        async with serving(svc) as address, wire.channel(address) as ch:
            stub = pb_grpc.MempoolStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _raw_put(stub, msgs)
            assert e.value.code() == code, (what, e.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Lookup(pb.GetRequest(family=FAM, layout=LAYOUT, keys=[b"x"]), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.Get(pb.GetRequest(family=FAM, layout=LAYOUT, keys=[bytes(16)] * 513), timeout=10):
                    pass
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert svc.store.num_blocks == 0  # a refused put stores nothing
            ok = await _raw_put(stub, [_msg(**NS)])
            assert ok.stored == 1
            assert (await stub.Stats(pb.Empty(), timeout=10)).rejected_requests == 3

    asyncio.run(main())


def test_a_message_over_the_grpc_limit_is_refused_and_the_pool_keeps_serving():
    async def main() -> None:
        # a client that sends without a limit, so the server's own limit is what refuses
        async with serving(pool_service()) as address, \
                grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as ch:
            stub = pb_grpc.MempoolStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Lookup(pb.GetRequest(family=FAM, layout="x" * (wire.MAX_MESSAGE_BYTES + 1)), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await stub.Stats(pb.Empty(), timeout=10)).capacity_bytes == 1 << 20

    asyncio.run(main())


def test_a_restarted_pool_is_empty_and_a_client_sees_a_miss_and_a_new_instance():
    async def main() -> None:
        client = InProcessPoolClient({"pool-0": service()})
        blocks = prompt_blocks(3, 3)
        await client.put("pool-0", FAM, LAYOUT, blocks)
        before = (await client.stats("pool-0")).instance
        client.services["pool-0"] = service()  # the pod restarted
        assert await client.get("pool-0", FAM, LAYOUT, [b.block_hash for b in blocks]) == []
        after = await client.stats("pool-0")
        assert after.instance != before and after.blocks == 0

    asyncio.run(main())


def test_config_reads_what_the_operator_renders_and_refuses_unknown_keys():
    cfg = PoolConfig.from_dict({"fleet": "chat", "port": 50052, "replicas": 2, "capacityBytesPerReplica": 1 << 30,
                                "highWatermark": 0.85, "blockSizeTokens": 16, "kvDtype": "int8",
                                "pinning": {"interactive": 1 << 28}})
    store = store_for(cfg)
    assert (store.capacity_bytes, store.high_watermark, store.pin_caps) == (1 << 30, 0.85, {"interactive": 1 << 28})
    with pytest.raises(ValueError, match="unknown keys"):
        PoolConfig.from_dict({"capacityBytesPerReplica": 1, "evictionPolicy": "lfu"})
    with pytest.raises(ValueError, match="required"):
        PoolConfig.from_dict({"highWatermark": 0.9})
    with pytest.raises(ValueError, match="high_watermark"):
        PoolConfig.from_dict({"capacityBytesPerReplica": 10, "highWatermark": 0})


def test_pool_metrics_reach_opentelemetry_for_the_autoscaler():
    from kvfleet.dataplane import tracing
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    tel = tracing.configure("mempool", metric_readers=[reader])
    try:
        svc = service()
        tel.observe_pool(svc.stats)

        async def main() -> None:
            client = InProcessPoolClient({"p": svc})
            blocks = prompt_blocks(5, 4)
            await client.put("p", FAM, LAYOUT, blocks)
            await client.get("p", FAM, LAYOUT, [b.block_hash for b in blocks] + [1])

        asyncio.run(main())
        data = reader.get_metrics_data()
        points = {m.name: m.data.data_points[0].value for rm in data.resource_metrics for sm in rm.scope_metrics
                  for m in sm.metrics if m.name.startswith("kvfleet.pool.")}
        assert points["kvfleet.pool.hits"] == 4 and points["kvfleet.pool.lookups"] == 5
        assert points["kvfleet.pool.insertions"] == 4 and points["kvfleet.pool.evictions"] == 0
        assert points["kvfleet.pool.bytes_in"] == 4 * 256 and points["kvfleet.pool.utilisation"] == 4 * 256 / (1 << 20)
    finally:
        tel.shutdown()
