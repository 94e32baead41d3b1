"""`DisaggregatedEngine`: the router's `AsyncEngine` — one request through a decode reservation,
a prefill call and a decode stream, so the OpenAI server code is the same as `kvfleet serve`'s.

    admit     -> Decode.Reserve on the pod with the most KV headroom (then least load); every pod
                 full: a sheddable class gets 429 + Retry-After, others wait for room (bounded)
    generate  -> Prefill.Prefill on the pod `routing.py` picks (round-robin, least loaded, or the one
                 holding most of the prompt's prefix, from the pods' KV events); it pushes the KV to
                 the decode pod -> the first token -> Decode.Generate, streamed. Both calls name the
                 memory pool's shards (discovered like the pods) when the fleet has a pool.
    failures  -> a prefill pod that fails: the next one; a decode pod that fails before it streamed
                 a token: another decode pod recomputes (no reservation, so no pushed KV); after
                 a token: a clean error to the client, never duplicated or wrong tokens

Load and headroom come from each pod's `Stats` (polled) plus this router's own in-flight counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import grpc
from kvfleet.dataplane import tracing
from kvfleet.dataplane.engine.api import (
    AsyncEngine,
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    RequestOutput,
)
from kvfleet.dataplane.roles import wire
from kvfleet.dataplane.roles.discovery import Endpoint, PodDiscovery
from kvfleet.dataplane.roles.routing import Candidate, PrefillPicker, RoutingPolicy
from kvfleet.dataplane.roles.transport import PREFILL_TIMEOUT_S, CallError, GrpcTransport, RoleTransport
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class PodLoad:
    """What the router knows of one pod: its last Stats and its own requests in flight there."""

    stats: pb.RoleStats = field(default_factory=pb.RoleStats)
    in_flight: int = 0

    @property
    def free_blocks(self) -> int:
        return self.stats.kv_blocks_total - self.stats.kv_blocks_used


@dataclass(frozen=True)
class RouterPolicy:
    """Admission knobs: which classes may be shed, how long critical work waits for room."""

    sheddable: frozenset[str] = frozenset()
    default_slo_class: str | None = None
    queue_timeout_s: float = 30.0
    retry_after_s: float = 1.0
    stats_interval_s: float = 0.5
    default_max_model_len: int = 2048
    max_queued_requests: int = 256  # above this many requests waiting for room, sheddable ones are refused at once


class DisaggregatedEngine(AsyncEngine):
    """Routes each request over prefill and decode pods found by `discovery`."""

    def __init__(self, discovery: PodDiscovery, variants: Iterable[str], policy: RouterPolicy | None = None,
                 transport: RoleTransport | None = None, routing: RoutingPolicy | None = None,
                 served_by: dict[str, str] | None = None) -> None:
        """served_by: variant -> the variant label of the pods that serve it (a LoRA variant's base's
        pods); a variant not named is served by pods labelled with its own name."""
        self.discovery = discovery
        self.served_by = dict(served_by or {})
        self.variants = sorted({self.served_by.get(v, v) for v in variants})  # pod groups to watch
        self.transport = transport or GrpcTransport()
        self.policy = policy or RouterPolicy()
        self.loads: dict[str, PodLoad] = {}  # address -> load
        self.picker = PrefillPicker(routing or RoutingPolicy())
        self._followers: dict[str, asyncio.Task[None]] = {}  # prefill pod address -> its KV-event stream
        self._reserved: dict[str, Endpoint] = {}  # request id -> decode pod holding its reservation
        self._poller: asyncio.Task[None] | None = None
        self.queued = 0  # requests waiting in `admit` for KV room
        self._queue_ms: dict[str, float] = {}  # request id -> time it waited for room (until generate)
        self.counters = {"requests": 0, "shed": 0, "decode_retries": 0, "prefill_retries": 0, "recomputed": 0}

    # -- AsyncEngine -------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        known = [ld.stats.max_model_len for ld in self.loads.values() if ld.stats.max_model_len]
        return min(known) if known else self.policy.default_max_model_len

    def stats(self) -> EngineStats:
        s = [ld.stats for ld in self.loads.values()]
        return EngineStats(num_running=sum(x.num_running for x in s), num_waiting=sum(x.num_waiting for x in s),
                           kv_blocks_total=sum(x.kv_blocks_total for x in s),
                           kv_blocks_used=sum(x.kv_blocks_used for x in s),
                           prefix_cache_hit_tokens=sum(x.prefix_cache_hit_tokens for x in s),
                           shared_prefix_tokens=sum(x.shared_prefix_tokens for x in s),
                           prompt_tokens=sum(x.prompt_tokens for x in s if x.role == "prefill"),
                           generation_tokens=sum(x.generation_tokens for x in s if x.role == "decode"),
                           num_preemptions=0)

    async def start(self) -> None:
        if self._poller is None:
            self.discovery.start()
            self._poller = asyncio.get_running_loop().create_task(self._poll_stats())

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for task in self._followers.values():
            task.cancel()
        self._followers.clear()
        self.discovery.stop()
        await self.transport.close()

    async def abort(self, request_id: str) -> None:
        ep = self._reserved.pop(request_id, None)
        if ep is not None:
            await self._release(ep, request_id)

    async def admit(self, request: GenerationRequest) -> None:
        """Reserve KV room on a decode pod before anything is sent to the client."""
        await self.start()
        wire.check_disaggregatable(request.sampling)  # before anything is reserved
        self.counters["requests"] += 1
        klass = request.slo_class or self.policy.default_slo_class
        deadline = time.monotonic() + self.policy.queue_timeout_s
        n, sp = len(request.prompt_token_ids), request.sampling
        sheddable = klass in self.policy.sheddable
        if sheddable and self.queued >= self.policy.max_queued_requests:
            self.counters["shed"] += 1
            raise EngineOverloaded(f"{self.queued} requests are queued for KV room; class {klass!r} is shed",
                                   self.policy.retry_after_s)
        self.queued += 1
        t0 = time.monotonic()
        try:
            await self._reserve(request, n, sp.max_tokens, sheddable, deadline)
        finally:
            self.queued -= 1
            self._queue_ms[request.request_id] = (time.monotonic() - t0) * 1000

    async def _reserve(self, request: GenerationRequest, n: int, max_tokens: int, sheddable: bool,
                       deadline: float) -> None:
        while True:
            for ep in self._decode_candidates(request.variant):
                try:
                    await self.transport.reserve(ep.address, pb.ReserveRequest(
                        request_id=request.request_id, num_prompt_tokens=n, max_tokens=max_tokens,
                        ttl_s=PREFILL_TIMEOUT_S + 30.0))  # outlives a prefill that queues as long as allowed
                except CallError as e:
                    if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise ValueError(e.details) from e
                    continue  # full (RESOURCE_EXHAUSTED) or gone: the next pod
                self._reserved[request.request_id] = ep
                return
            if sheddable or time.monotonic() >= deadline:
                self.counters["shed"] += 1
                raise EngineOverloaded(f"no decode pod of {request.variant!r} has KV room for this request now",
                                       self.policy.retry_after_s)
            await asyncio.sleep(0.05)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:  # type: ignore[override]
        rid = request.request_id
        if rid not in self._reserved:
            await self.admit(request)
        decode = self._reserved.pop(rid)
        decoded = False  # decode claimed the reservation and finished: nothing to release
        tracing.annotate(**{"kvfleet.queue_ms": self._queue_ms.pop(rid, None), "kvfleet.decode_pod": decode.name})
        try:
            t0 = time.monotonic()
            reply = await self._prefill(request, decode)
            tracing.annotate(**{"kvfleet.prefill_ms": reply.prefill_s * 1000, "kvfleet.transfer_ms": reply.transfer_s * 1000,
                                "kvfleet.kv_transfer_bytes": reply.kv_bytes, "kvfleet.kv_transfer_ok": reply.transfer_ok,
                                "kvfleet.prefill_call_ms": (time.monotonic() - t0) * 1000})
            lps = [wire.logprob_from_pb(reply.logprob)] if request.sampling.logprobs is not None else None
            yield RequestOutput(rid, [reply.first_token_id], bool(reply.finish_reason), reply.finish_reason or None,
                                lps, reply.num_prompt_tokens, reply.num_cached_prompt_tokens)
            if reply.finish_reason:
                return
            async for out in self._decode(request, decode, reply):
                decoded = out.finished
                yield out
        finally:
            if not decoded:
                await self._release(decode, rid)

    # -- the two hops ----------------------------------------------------------------------

    async def _prefill(self, request: GenerationRequest, decode: Endpoint) -> pb.PrefillReply:
        msg = pb.PrefillRequest(request=wire.request_to_pb(request),
                                target=pb.KVTarget(address=decode.address, reservation=request.request_id),
                                pool=self.pool_shards())
        eps = {e.address: e for e in self._pods("prefill", request.variant)}
        pick = self.picker.pick([Candidate(e.name, e.address, self._load(e).in_flight + self._load(e).stats.num_waiting,
                                           self._load(e).stats.max_num_seqs,
                                           request.variant in self._load(e).stats.adapters_resident)
                                 for e in eps.values()],
                                request.variant, request.prompt_token_ids)
        tracing.annotate(**{"kvfleet.prefix_matched_blocks": pick.matched_blocks,
                            "kvfleet.prompt_blocks": pick.prompt_blocks})
        for cand in pick.order:
            ep = eps[cand.address]
            with self._busy(ep):
                try:
                    tracing.annotate(**{"kvfleet.prefill_pod": ep.name})
                    reply = await self.transport.prefill(ep.address, msg, tracing.inject())
                    tracing.annotate(**{"kvfleet.pool_hit_blocks": reply.num_pool_blocks})
                    return reply
                except CallError as e:
                    if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise ValueError(e.details) from e
                    if e.code not in RETRYABLE:
                        raise
                    self.counters["prefill_retries"] += 1
                    log.warning("prefill pod %s failed (%s); trying another", ep.name, e.code)
        raise RuntimeError(f"no prefill pod of {request.variant!r} answered")

    def pool_shards(self) -> list[str]:
        """The memory pool's pods in ordinal order (every pod must agree on a prompt's shard)."""
        def ordinal(ep: Endpoint) -> tuple[int, str]:
            tail = ep.name.rpartition("-")[2]
            return (int(tail) if tail.isdigit() else -1, ep.name)
        return [e.address for e in sorted(self.discovery.endpoints("mempool", ""), key=ordinal)]

    async def _decode(self, request: GenerationRequest, decode: Endpoint,
                      reply: pb.PrefillReply) -> AsyncIterator[RequestOutput]:
        ep, reservation, streamed = decode, request.request_id, False
        tried = {decode.address}
        while True:
            msg = pb.GenerateRequest(request=wire.request_to_pb(request), reservation=reservation,
                                     first_token_id=reply.first_token_id, pool=self.pool_shards())
            stream = self.transport.generate(ep.address, msg, tracing.inject())
            try:
                with self._busy(ep):
                    async for chunk in stream:
                        streamed = True
                        self.counters["recomputed"] += chunk.recomputed
                        done = bool(chunk.finish_reason)
                        lps = [wire.logprob_from_pb(x) for x in chunk.logprobs] \
                            if request.sampling.logprobs is not None else None
                        yield RequestOutput(request.request_id, list(chunk.token_ids), done,
                                            chunk.finish_reason or None, lps, reply.num_prompt_tokens,
                                            reply.num_cached_prompt_tokens)
                        if done:
                            return
                raise RuntimeError(f"decode pod {ep.name} ended the stream without finishing")
            except CallError as e:
                if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(e.details) from e
                nxt = [c for c in self._decode_candidates(request.variant) if c.address not in tried]
                if streamed or e.code not in RETRYABLE or not nxt:
                    raise RuntimeError(f"decode pod {ep.name} failed mid-stream ({e.code.name})") from e
                # nothing streamed yet: another decode pod recomputes prompt + first token
                self.counters["decode_retries"] += 1
                log.warning("decode pod %s failed (%s) before streaming; retrying on %s", ep.name, e.code,
                            nxt[0].name)
                ep, reservation = nxt[0], ""
                tried.add(ep.address)
            finally:
                await stream.aclose()  # a client gone mid-stream cancels the call: decode frees its blocks

    # -- picking -----------------------------------------------------------------------------

    def _pods(self, role: str, variant: str) -> list[Endpoint]:
        """The pods of `role` that serve `variant` (its group's: LoRA variants share their base's pods)."""
        return self.discovery.endpoints(role, self.served_by.get(variant, variant))

    def _load(self, ep: Endpoint) -> PodLoad:
        return self.loads.setdefault(ep.address, PodLoad())

    def _decode_candidates(self, variant: str) -> list[Endpoint]:
        """Pods that already hold the variant's LoRA adapter first, then most KV headroom, then least load."""
        eps = self._pods("decode", variant)
        return sorted(eps, key=lambda e: (variant not in self._load(e).stats.adapters_resident,
                                          -self._load(e).free_blocks, self._load(e).in_flight, e.name))

    @contextlib.contextmanager
    def _busy(self, ep: Endpoint):  # type: ignore[no-untyped-def]
        load = self._load(ep)
        load.in_flight += 1
        try:
            yield
        finally:
            load.in_flight -= 1

    async def _release(self, ep: Endpoint, rid: str) -> None:
        with contextlib.suppress(CallError):
            await self.transport.release(ep.address, rid)

    async def _poll_stats(self) -> None:
        """Refresh every known pod's Stats; forget pods that left discovery."""
        while True:
            eps = {}
            for variant in self.variants:
                for role in ("prefill", "decode"):
                    for ep in self.discovery.endpoints(role, variant):
                        eps[ep.address] = ep
            for addr in [a for a in self.loads if a not in eps]:
                self.loads.pop(addr, None)
                await self.transport.forget(addr)
            for addr in [a for a in self._followers if a not in eps]:
                self._followers.pop(addr).cancel()
                self.picker.index.forget(addr)
            for ep in eps.values():
                if ep.role == "prefill" and ep.address not in self._followers:
                    self._followers[ep.address] = asyncio.get_running_loop().create_task(self._follow(ep))
            await asyncio.gather(*(self._refresh(ep) for ep in eps.values()), return_exceptions=True)
            await asyncio.sleep(self.policy.stats_interval_s)

    async def _refresh(self, ep: Endpoint) -> None:
        self._load(ep).stats = await self.transport.stats(ep.address, ep.role)

    async def _follow(self, ep: Endpoint) -> None:
        """Keep the prefix index current with `ep`'s KV events; a broken stream is re-opened (snapshot first)."""
        while True:
            try:
                async for batch in self.transport.kv_events(ep.address, ep.role):
                    self.picker.index.apply(ep.address, batch)
            except CallError as e:
                log.debug("KV events of %s: %s", ep.name, e.code)
            self.picker.index.forget(ep.address)
            await asyncio.sleep(1.0)
