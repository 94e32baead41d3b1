"""The seam between roles: how the router reaches prefill/decode pods and prefill pushes KV to decode.

`RoleTransport` is the contract (the calls of `rpc/kvfleet.proto`, addressed by "host:port");
`GrpcTransport` is the real one, `InProcessTransport` the in-process fake that hands each call to a
`PrefillService` / `DecodeService` object directly (same messages, same errors, no sockets), so
routing, admission and the hand-off are unit-tested without processes. Every failure surfaces as a
`CallError` carrying the gRPC status code, whichever transport raised it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from kvfleet.dataplane.roles import wire
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

Metadata = tuple[tuple[str, str], ...]
PREFILL_TIMEOUT_S = 600.0  # a prefill call's deadline; a decode reservation outlives it (`Reserve.ttl_s`)


class CallError(Exception):
    """A failed call: its gRPC status code and the callee's reason."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class RoleTransport(ABC):
    """Calls to the fleet's prefill and decode pods. Errors are `CallError`s."""

    @abstractmethod
    async def reserve(self, address: str, msg: pb.ReserveRequest) -> pb.ReserveReply: ...

    @abstractmethod
    async def prefill(self, address: str, msg: pb.PrefillRequest, metadata: Metadata = ()) -> pb.PrefillReply: ...

    @abstractmethod
    def generate(self, address: str, msg: pb.GenerateRequest, metadata: Metadata = ()) -> AsyncIterator[pb.TokenChunk]:
        """The decode stream; closing the iterator early cancels the call (decode frees the request)."""

    @abstractmethod
    async def release(self, address: str, reservation: str) -> None: ...

    @abstractmethod
    async def push_kv(self, address: str, chunks: Sequence[pb.KVChunk], metadata: Metadata = ()) -> pb.PushReply: ...

    @abstractmethod
    async def stats(self, address: str, role: str) -> pb.RoleStats: ...

    @abstractmethod
    def kv_events(self, address: str, role: str) -> AsyncIterator[pb.KVEventBatch]:
        """The pod's prefix-cache events (a snapshot, then deltas) until the iterator is closed."""

    async def forget(self, address: str) -> None:  # noqa: B027 - optional hook
        """Drop what is held for a pod that left discovery (a channel)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything."""


class GrpcTransport(RoleTransport):
    """The real transport: one gRPC channel per pod address."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _ch(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = wire.channel(address)
        return ch

    async def reserve(self, address: str, msg: pb.ReserveRequest) -> pb.ReserveReply:
        try:
            return await pb_grpc.DecodeStub(self._ch(address)).Reserve(msg, timeout=5.0)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def prefill(self, address: str, msg: pb.PrefillRequest, metadata: Metadata = ()) -> pb.PrefillReply:
        try:
            return await pb_grpc.PrefillStub(self._ch(address)).Prefill(msg, timeout=PREFILL_TIMEOUT_S, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def generate(self, address: str, msg: pb.GenerateRequest,  # type: ignore[override]
                       metadata: Metadata = ()) -> AsyncIterator[pb.TokenChunk]:
        call = pb_grpc.DecodeStub(self._ch(address)).Generate(msg, metadata=metadata)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e
        finally:
            call.cancel()  # no-op once finished

    async def release(self, address: str, reservation: str) -> None:
        try:
            await pb_grpc.DecodeStub(self._ch(address)).Release(pb.ReleaseRequest(reservation=reservation), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def push_kv(self, address: str, chunks: Sequence[pb.KVChunk], metadata: Metadata = ()) -> pb.PushReply:
        try:
            async with wire.channel(address) as ch:  # its own channel: a push is large and one-off
                return await pb_grpc.DecodeStub(ch).PushKV(iter(chunks), timeout=30.0, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    def _role_stub(self, address: str, role: str) -> Any:
        """The stub of the service a pod of `role` serves (both have Stats and KVEvents)."""
        ch = self._ch(address)
        return pb_grpc.DecodeStub(ch) if role == "decode" else pb_grpc.PrefillStub(ch)

    async def stats(self, address: str, role: str) -> pb.RoleStats:
        try:
            return await self._role_stub(address, role).Stats(pb.Empty(), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e

    async def kv_events(self, address: str, role: str) -> AsyncIterator[pb.KVEventBatch]:  # type: ignore[override]
        call = self._role_stub(address, role).KVEvents(pb.KVEventsRequest())
        try:
            async for batch in call:
                yield batch
        except grpc.aio.AioRpcError as e:
            raise CallError(e.code(), e.details() or "") from e
        finally:
            call.cancel()

    async def forget(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)


class FakeContext:
    """Enough of `grpc.aio.ServicerContext` for the services: abort raises `CallError`."""

    def __init__(self, metadata: Metadata = ()) -> None:
        self._metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise CallError(code, details)

    def invocation_metadata(self) -> Metadata:
        return self._metadata


class InProcessServices:
    """What every in-process fake shares: addresses map to service objects; a missing or `down` one is
    UNAVAILABLE, and each call is recorded."""

    def __init__(self, services: dict[str, Any] | None = None) -> None:
        self.services: dict[str, Any] = dict(services or {})
        self.down: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (method, address), for assertions

    def _svc(self, method: str, address: str) -> Any:
        self.calls.append((method, address))
        svc = self.services.get(address)
        if svc is None or address in self.down:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"{address} is unreachable")
        return svc


class InProcessTransport(InProcessServices, RoleTransport):
    """The in-process fake of the roles: calls go to `PrefillService` / `DecodeService` objects directly."""

    async def reserve(self, address: str, msg: pb.ReserveRequest) -> pb.ReserveReply:
        return await self._svc("Reserve", address).Reserve(msg, FakeContext())  # type: ignore[no-any-return]

    async def prefill(self, address: str, msg: pb.PrefillRequest, metadata: Metadata = ()) -> pb.PrefillReply:
        return await self._svc("Prefill", address).Prefill(msg, FakeContext(metadata))  # type: ignore[no-any-return]

    async def generate(self, address: str, msg: pb.GenerateRequest,  # type: ignore[override]
                       metadata: Metadata = ()) -> AsyncIterator[pb.TokenChunk]:
        stream = self._svc("Generate", address).Generate(msg, FakeContext(metadata))
        try:
            async for chunk in stream:
                if address in self.down:  # the pod died mid-stream
                    raise CallError(grpc.StatusCode.UNAVAILABLE, f"{address} went away")
                yield chunk
        finally:
            await stream.aclose()

    async def release(self, address: str, reservation: str) -> None:
        await self._svc("Release", address).Release(pb.ReleaseRequest(reservation=reservation), FakeContext())

    async def push_kv(self, address: str, chunks: Sequence[pb.KVChunk], metadata: Metadata = ()) -> pb.PushReply:
        async def stream() -> AsyncIterator[pb.KVChunk]:
            for c in chunks:
                yield c

        return await self._svc("PushKV", address).PushKV(stream(), FakeContext(metadata))  # type: ignore[no-any-return]

    async def stats(self, address: str, role: str) -> pb.RoleStats:
        return await self._svc("Stats", address).Stats(pb.Empty(), FakeContext())  # type: ignore[no-any-return]

    async def kv_events(self, address: str, role: str) -> AsyncIterator[pb.KVEventBatch]:  # type: ignore[override]
        stream = self._svc("KVEvents", address).KVEvents(pb.KVEventsRequest(), FakeContext())
        try:
            async for batch in stream:
                if address in self.down:
                    raise CallError(grpc.StatusCode.UNAVAILABLE, f"{address} went away")
                yield batch
        finally:
            await stream.aclose()
