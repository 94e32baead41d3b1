"""The seam between prefill/decode and the memory pool: `PoolClient` (contract), gRPC and in-process fake.

Blocks are named as the engine names them: `block_hash` is the int from `blocks.hash_block`
(converted to the pool's 16 bytes in one place, `kvcache/keys.py`), the payload is the block as
stored (`transfer.read_block`) and `crc32` its `keys.checksum`. `(family, layout)` is the namespace:
the model family and `transfer.layout` of the caller's cache. Every failure is a `CallError` with
the gRPC status code, whichever implementation raised it; a pool that is down or restarted is
never fatal to a caller (a miss means recompute).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from kvfleet.dataplane.kvcache.keys import hash_from_bytes, hash_to_bytes
from kvfleet.dataplane.roles import wire
from kvfleet.dataplane.roles.transport import CallError, FakeContext, InProcessServices
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class PoolBlock:
    """One full block: its prefix chain hash (as the engine keeps it), payload as stored, CRC-32."""

    block_hash: int
    payload: bytes
    crc32: int


def put_messages(family: str, layout: str, blocks: Sequence[PoolBlock], slo_class: str = "") -> list[pb.PoolBlock]:
    """A Put stream: the first message names the namespace and class."""
    msgs = [pb.PoolBlock(block_hash=hash_to_bytes(b.block_hash), payload=b.payload, crc32=b.crc32) for b in blocks]
    if msgs:
        msgs[0].family, msgs[0].layout, msgs[0].slo_class = family, layout, slo_class
    return msgs


def get_request(family: str, layout: str, block_hashes: Sequence[int]) -> pb.GetRequest:
    return pb.GetRequest(family=family, layout=layout, keys=[hash_to_bytes(h) for h in block_hashes])


def block_from_pb(m: pb.PoolBlock) -> PoolBlock:
    return PoolBlock(hash_from_bytes(m.block_hash), m.payload, m.crc32)


class PoolClient(ABC):
    """Calls to the fleet's memory pool pods, addressed by "host:port". Errors are `CallError`s."""

    @abstractmethod
    async def put(self, address: str, family: str, layout: str, blocks: Sequence[PoolBlock],
                  slo_class: str = "") -> pb.PutReply:
        """Offer a prompt's full blocks (chain order). The pool keeps what it can; it never fails for room."""

    @abstractmethod
    async def get(self, address: str, family: str, layout: str, block_hashes: Sequence[int]) -> list[PoolBlock]:
        """The longest leading run of `block_hashes` the pool holds, in order (check each CRC before use)."""

    @abstractmethod
    async def lookup(self, address: str, family: str, layout: str, block_hashes: Sequence[int]) -> int:
        """How many leading blocks the pool holds, without moving payloads."""

    @abstractmethod
    async def stats(self, address: str) -> pb.PoolStats: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything."""


class GrpcPoolClient(PoolClient):
    """The real client: one channel per pool address."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.MempoolStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = wire.channel(address)
        return pb_grpc.MempoolStub(ch)

    async def put(self, address: str, family: str, layout: str, blocks: Sequence[PoolBlock],
                  slo_class: str = "") -> pb.PutReply:
        try:
            return await self._stub(address).Put(iter(put_messages(family, layout, blocks, slo_class)),
                                                 timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def get(self, address: str, family: str, layout: str, block_hashes: Sequence[int]) -> list[PoolBlock]:
        try:
            call = self._stub(address).Get(get_request(family, layout, block_hashes), timeout=self.timeout_s)
            return [block_from_pb(m) async for m in call]
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def lookup(self, address: str, family: str, layout: str, block_hashes: Sequence[int]) -> int:
        try:
            reply = await self._stub(address).Lookup(get_request(family, layout, block_hashes), timeout=self.timeout_s)
            return int(reply.num_blocks)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def stats(self, address: str) -> pb.PoolStats:
        try:
            return await self._stub(address).Stats(pb.Empty(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


class InProcessPoolClient(InProcessServices, PoolClient):
    """The in-process fake: addresses map to `MempoolService` objects (same messages, same errors)."""

    async def put(self, address: str, family: str, layout: str, blocks: Sequence[PoolBlock],
                  slo_class: str = "") -> pb.PutReply:
        async def stream() -> AsyncIterator[pb.PoolBlock]:
            for m in put_messages(family, layout, blocks, slo_class):
                yield m

        return await self._svc("Put", address).Put(stream(), FakeContext())  # type: ignore[no-any-return]

    async def get(self, address: str, family: str, layout: str, block_hashes: Sequence[int]) -> list[PoolBlock]:
        stream = self._svc("Get", address).Get(get_request(family, layout, block_hashes), FakeContext())
        return [block_from_pb(m) async for m in stream]

    async def lookup(self, address: str, family: str, layout: str, block_hashes: Sequence[int]) -> int:
        reply = await self._svc("Lookup", address).Lookup(get_request(family, layout, block_hashes), FakeContext())
        return int(reply.num_blocks)

    async def stats(self, address: str) -> pb.PoolStats:
        return await self._svc("Stats", address).Stats(pb.Empty(), FakeContext())  # type: ignore[no-any-return]
