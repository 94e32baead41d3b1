"""The prefill and decode gRPC services over one `AsyncLLMEngine` each (contracts in `rpc/kvfleet.proto`).

prefill: `Prefill` runs the prompt with `max_tokens=1` and `export_kv`, samples the first token,
and pushes the prompt's KV — as stored, block by block with checksums — to the decode pod the
router reserved room on. A push that fails is reported (`transfer_ok=False`), never retried here:
decode recomputes what it did not get. With the memory pool (`PrefillRequest.pool`), the prompt's
blocks the pool holds are fetched first and the ones computed here offered after (`pool_use.py`).

decode: `Reserve` holds blocks before anything moves (RESOURCE_EXHAUSTED when there is no room);
`PushKV` parks the KV under its reservation; `Generate` continues after the first token and
streams tokens; cancelling `Generate` (router or client gone) aborts the request and frees its
blocks. Reservations nobody claims expire. A decode pod that must recompute asks the pool first.

Both publish their prefix cache's events (`KVEvents`, `kv_events.py`) for prefix-aware routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import grpc
from kvfleet.dataplane import tracing
from kvfleet.dataplane.engine.api import KVHandoff
from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine
from kvfleet.dataplane.engine.handoff import usable
from kvfleet.dataplane.roles import wire
from kvfleet.dataplane.roles.kv_events import KVEventHub
from kvfleet.dataplane.roles.pool_use import PoolAccess, PoolFetch
from kvfleet.dataplane.roles.transport import CallError, GrpcTransport, RoleTransport
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RESERVATION_TTL_S = 60.0  # when the caller names none
MAX_RESERVATION_TTL_S = 3600.0


def role_stats(role: str, engine: AsyncLLMEngine, pool: PoolAccess | None, **extra: int) -> pb.RoleStats:
    s = engine.stats()
    if pool is not None:
        extra.update(pool.stats())
    adapters = engine.engine.adapters
    return pb.RoleStats(role=role, prompt_tokens_computed=engine.engine.prompt_tokens_computed,
                        adapters_resident=list(adapters.resident) if adapters is not None else [], num_running=s.num_running, num_waiting=s.num_waiting,
                        kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used,
                        prompt_tokens=s.prompt_tokens, generation_tokens=s.generation_tokens,
                        prefix_cache_hit_tokens=s.prefix_cache_hit_tokens, max_model_len=engine.max_model_len,
                        shared_prefix_tokens=s.shared_prefix_tokens,
                        max_num_seqs=engine.engine.config.max_num_seqs, **extra)


async def _invalid(context: grpc.aio.ServicerContext, e: Exception) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class PrefillService(pb_grpc.PrefillServicer):
    """Prompt KV and first token; KV pushed to the decode pod named in the call."""

    def __init__(self, engine: AsyncLLMEngine, transport: RoleTransport | None = None,
                 corrupt_for_test: bool = False, telemetry: tracing.Telemetry | None = None,
                 pool: PoolAccess | None = None) -> None:
        self.engine = engine
        self.telemetry = telemetry
        self.transport = transport or GrpcTransport()
        self.pool = pool
        self.events = KVEventHub(engine)
        self.kv_blocks_sent = 0
        self.kv_bytes_sent = 0
        self.corrupt_for_test = corrupt_for_test  # flips one byte of every push (failure tests only)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillReply:
        with tracing.hop_span(self.telemetry, "prefill", context.invocation_metadata(),
                              **{"kvfleet.request_id": request.request.request_id,
                                 "gen_ai.usage.input_tokens": len(request.request.prompt_token_ids)}):
            reply = await self._prefill(request, context)
            tracing.annotate(**{"kvfleet.prefix_hit_tokens": reply.num_cached_prompt_tokens,
                                "kvfleet.pool_hit_blocks": reply.num_pool_blocks,
                                "kvfleet.kv_transfer_bytes": reply.kv_bytes, "kvfleet.transfer_ms": reply.transfer_s * 1000,
                                "kvfleet.kv_transfer_ok": reply.transfer_ok})
            return reply

    async def _prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillReply:
        try:
            greq = wire.request_from_pb(request.request)
        except ValueError as e:
            await _invalid(context, e)
        want = greq.sampling.max_tokens
        greq.sampling = type(greq.sampling)(**{**greq.sampling.__dict__, "max_tokens": 1})
        t0 = time.monotonic()
        shards = list(request.pool)
        fetched = await self.pool.fetch(greq, shards) if self.pool else PoolFetch()
        offering = self.pool is not None and self.pool.enabled and bool(shards)
        greq.export_kv = bool(request.target.address) or offering
        final = None
        try:
            async for out in self.engine.generate(greq):
                final = out
        except ValueError as e:
            await _invalid(context, e)
        assert final is not None and final.finished
        reply = pb.PrefillReply(first_token_id=final.new_token_ids[0], num_prompt_tokens=final.num_prompt_tokens,
                                num_cached_prompt_tokens=final.num_cached_prompt_tokens,
                                prefill_s=time.monotonic() - t0, num_pool_blocks=fetched.pool_blocks)
        if final.logprobs:
            reply.logprob.CopyFrom(wire.logprob_to_pb(final.logprobs[0]))
        if final.finish_reason == "stop" or want == 1:
            reply.finish_reason = final.finish_reason or "length"
        if final.kv is not None and offering:
            assert self.pool is not None
            self.pool.offer(final.kv, shards, fetched, greq.slo_class or "")
        if final.kv is not None and request.target.address and not reply.finish_reason:
            await self._push(final.kv, request.target, reply, tracing.inject())
        return reply

    async def _push(self, kv: KVHandoff, target: pb.KVTarget, reply: pb.PrefillReply,
                    metadata: tuple[tuple[str, str], ...]) -> None:
        t0 = time.monotonic()
        chunks = list(wire.handoff_to_chunks(kv, target.reservation))
        if self.corrupt_for_test and chunks:
            bad = bytearray(chunks[0].payload)
            bad[len(bad) // 2] ^= 0xFF
            chunks[0].payload = bytes(bad)
        try:
            await self.transport.push_kv(target.address, chunks, metadata)
            reply.transfer_ok = True
        except CallError as e:
            log.warning("KV push to %s failed (%s); decode will recompute", target.address, e)
        reply.kv_blocks, reply.kv_bytes = len(kv.blocks), kv.nbytes
        reply.transfer_s = time.monotonic() - t0
        if reply.transfer_ok:
            self.kv_blocks_sent += len(kv.blocks)
            self.kv_bytes_sent += kv.nbytes

    async def KVEvents(self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        async for batch in self.events.subscribe():
            yield batch

    async def Stats(self, request: pb.Empty, context: grpc.aio.ServicerContext) -> pb.RoleStats:
        return role_stats("prefill", self.engine, self.pool, kv_blocks_sent=self.kv_blocks_sent, kv_bytes_sent=self.kv_bytes_sent)


class DecodeService(pb_grpc.DecodeServicer):
    """Reservations, KV intake and token streaming over a decode engine."""

    def __init__(self, engine: AsyncLLMEngine, telemetry: tracing.Telemetry | None = None,
                 pool: PoolAccess | None = None) -> None:
        self.engine = engine
        self.telemetry = telemetry
        self.pool = pool
        self.events = KVEventHub(engine)
        self.pushed: dict[str, KVHandoff] = {}  # reservation -> KV, until Generate claims it
        self.kv_blocks_received = 0
        self.kv_bytes_received = 0
        self.kv_checksum_failures = 0
        self._reaper: asyncio.Task[None] | None = None

    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.ReserveReply:
        self._start_reaper()
        rid = request.request_id
        try:
            ttl = min(request.ttl_s or RESERVATION_TTL_S, MAX_RESERVATION_TTL_S)
            ok = await self.engine.call(lambda e: e.reserve(rid, request.num_prompt_tokens, request.max_tokens, ttl))
        except ValueError as e:
            await _invalid(context, e)
        if not ok:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no KV room or seat for this request now; "
                                                                    "retry on another decode pod or later")
        free = self.engine.stats()
        return pb.ReserveReply(reservation=rid, free_blocks=free.kv_blocks_total - free.kv_blocks_used)

    async def PushKV(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> pb.PushReply:
        try:
            reservation, kv = await wire.handoff_from_chunks(request_iterator)
        except ValueError as e:
            await _invalid(context, e)
        held = await self.engine.call(lambda e: reservation in e.reservations.tables)
        if not held:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no reservation {reservation!r} (expired?)")
        self.kv_blocks_received += len(kv.blocks)
        self.kv_bytes_received += kv.nbytes
        why = usable(self.engine.engine, kv, kv.num_tokens)
        if why is not None:
            self.kv_checksum_failures += "checksum" in why
            await context.abort(grpc.StatusCode.DATA_LOSS, f"KV for {reservation!r} refused: {why}; "
                                                           "decode recomputes it")
        self.pushed[reservation] = kv
        return pb.PushReply(blocks=len(kv.blocks), bytes=kv.nbytes)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            greq = wire.request_from_pb(request.request)
        except ValueError as e:
            await _invalid(context, e)
        kv = self.pushed.pop(request.reservation, None) if request.reservation else None
        if not request.reservation:
            greq.request_id = f"{greq.request_id}-{uuid.uuid4().hex[:8]}"  # a retry: never collide with a reservation
        if kv is None and self.pool is not None:
            await self.pool.fetch(greq, list(request.pool))  # recompute what the pool does not hold
        before = self.engine.recomputed
        first = True
        with tracing.hop_span(self.telemetry, "decode", context.invocation_metadata(),
                              **{"kvfleet.request_id": greq.request_id, "kvfleet.kv_received": kv is not None}):
            async for chunk in self._generate(greq, request, kv, context):
                if first:
                    chunk.recomputed = self.engine.recomputed > before
                    tracing.annotate(**{"kvfleet.recomputed": chunk.recomputed})
                    first = False
                yield chunk

    async def _generate(self, greq: Any, request: pb.GenerateRequest, kv: KVHandoff | None,
                        context: grpc.aio.ServicerContext) -> Any:
        try:
            async for out in self.engine.continue_prefilled(greq, request.first_token_id, kv):
                chunk = pb.TokenChunk(token_ids=out.new_token_ids,
                                      logprobs=[wire.logprob_to_pb(lp) for lp in out.logprobs or ()],
                                      finish_reason=out.finish_reason or "" if out.finished else "",
                                      num_prompt_tokens=out.num_prompt_tokens,
                                      num_cached_prompt_tokens=out.num_cached_prompt_tokens)
                yield chunk
        except ValueError as e:
            await _invalid(context, e)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.Empty:
        self.pushed.pop(request.reservation, None)
        await self.engine.call(lambda e: e.release_reservation(request.reservation))
        return pb.Empty()

    async def Stats(self, request: pb.Empty, context: grpc.aio.ServicerContext) -> pb.RoleStats:
        n = len(self.engine.engine.reservations.tables)
        return role_stats("decode", self.engine, self.pool, reservations=n, kv_blocks_received=self.kv_blocks_received,
                          kv_bytes_received=self.kv_bytes_received, kv_checksum_failures=self.kv_checksum_failures,
                          recomputes=self.engine.recomputed)

    async def KVEvents(self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        async for batch in self.events.subscribe():
            yield batch

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Free reservations no Generate claimed within the TTL (a router died in between)."""
        while True:
            await asyncio.sleep(5.0)
            gone = await self.engine.call(lambda e: e.reservations.expire(e))
            for rid in gone:
                self.pushed.pop(rid, None)
