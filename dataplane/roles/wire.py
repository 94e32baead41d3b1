"""Engine types <-> gRPC messages, and the plumbing every role shares (server, channels, health).

One place converts: `SamplingParams`, `TokenLogprob`, `GenerationRequest`, `KVHandoff` to and from
their `kvfleet.proto` messages, so the roles read as logic, not field copying.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from aiohttp import web
from kvfleet.dataplane.engine.api import (
    GenerationRequest,
    InvalidRequest,
    KVBlock,
    KVHandoff,
    SamplingParams,
    TokenLogprob,
)
from kvfleet.dataplane.kvcache import keys
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def sampling_to_pb(sp: SamplingParams) -> pb.Sampling:
    """What crosses between roles; n > 1 and grammars stay in one engine (`check_disaggregatable`)."""
    check_disaggregatable(sp)
    return pb.Sampling(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                       has_seed=sp.seed is not None, seed=sp.seed or 0, stop_token_ids=list(sp.stop_token_ids),
                       ignore_eos=sp.ignore_eos, logprobs=-1 if sp.logprobs is None else sp.logprobs,
                       presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
                       repetition_penalty=sp.repetition_penalty, min_tokens=sp.min_tokens,
                       logit_bias=[pb.TopLogprob(token_id=t, logprob=b) for t, b in sp.logit_bias])


def sampling_from_pb(m: pb.Sampling) -> SamplingParams:
    return SamplingParams(max_tokens=m.max_tokens, temperature=m.temperature, top_p=m.top_p, top_k=m.top_k,
                          seed=m.seed if m.has_seed else None, stop_token_ids=tuple(m.stop_token_ids),
                          ignore_eos=m.ignore_eos, logprobs=None if m.logprobs < 0 else m.logprobs,
                          presence_penalty=m.presence_penalty, frequency_penalty=m.frequency_penalty,
                          repetition_penalty=m.repetition_penalty or 1.0, min_tokens=m.min_tokens,
                          logit_bias=tuple((b.token_id, b.logprob) for b in m.logit_bias))


def check_disaggregatable(sp: SamplingParams) -> None:
    """Refuse (a 400 naming the parameter) what the prefill -> decode hand-off does not carry yet."""
    if sp.n != 1:
        raise InvalidRequest("n > 1 (and best_of) is not served by a disaggregated fleet yet; send n = 1 or use a "
                             "colocated fleet", param="n")
    if sp.json_schema is not None:
        raise InvalidRequest("structured output (response_format, or tools with a required or named tool_choice) "
                             "is not served by a disaggregated fleet yet: the grammar state does not travel from "
                             "prefill to decode; use a colocated fleet", param="response_format")


def request_to_pb(r: GenerationRequest) -> pb.Request:
    return pb.Request(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                      sampling=sampling_to_pb(r.sampling), variant=r.variant, slo_class=r.slo_class or "")


def request_from_pb(m: pb.Request) -> GenerationRequest:
    return GenerationRequest(m.request_id, list(m.prompt_token_ids), sampling_from_pb(m.sampling),
                             variant=m.variant, slo_class=m.slo_class or None)


def logprob_to_pb(lp: TokenLogprob) -> pb.Logprob:
    return pb.Logprob(token_id=lp.token_id, logprob=lp.logprob,
                      top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_pb(m: pb.Logprob) -> TokenLogprob:
    return TokenLogprob(m.token_id, m.logprob, tuple((t.token_id, t.logprob) for t in m.top))


def handoff_to_chunks(kv: KVHandoff, reservation: str) -> Iterable[pb.KVChunk]:
    """The first chunk carries the header; one chunk per block; the lane (if any) last."""
    for i, b in enumerate(kv.blocks):
        chunk = pb.KVChunk(index=b.index, payload=b.payload, crc32c=b.crc32,
                           block_hash=b"" if b.block_hash is None else keys.hash_to_bytes(b.block_hash))
        if i == 0:
            chunk.reservation, chunk.layout = reservation, kv.layout
            chunk.num_blocks, chunk.num_tokens = len(kv.blocks), kv.num_tokens
            chunk.rng_state, chunk.num_hit_blocks = kv.rng_state, kv.num_hit_blocks
            chunk.num_cached_prompt_tokens = kv.num_cached_prompt_tokens
        yield chunk
    if kv.lane:
        yield pb.KVChunk(index=-1, lane=True, payload=kv.lane, crc32c=kv.lane_crc32)


async def handoff_from_chunks(chunks: AsyncIterator[pb.KVChunk]) -> tuple[str, KVHandoff]:
    """(reservation, hand-off) from a PushKV stream. Checksums are checked by the engine, not here."""
    head: pb.KVChunk | None = None
    blocks: list[KVBlock] = []
    lane, lane_crc = b"", 0
    async for c in chunks:
        if head is None:
            head = c
        if c.lane:
            lane, lane_crc = c.payload, c.crc32c
            continue
        h = keys.hash_from_bytes(c.block_hash) if c.block_hash else None
        blocks.append(KVBlock(c.index, h, c.payload, c.crc32c))
    if head is None or not head.reservation:
        raise ValueError("a KV push must start with a chunk naming its reservation")
    if len(blocks) != head.num_blocks or sorted(b.index for b in blocks) != list(range(head.num_blocks)):
        raise ValueError(f"a KV push announced {head.num_blocks} blocks and sent {len(blocks)}")
    return head.reservation, KVHandoff(head.layout, head.num_tokens, blocks, lane, lane_crc, head.num_hit_blocks,
                                       head.num_cached_prompt_tokens, head.rng_state)


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def start_grpc(servicers: list[tuple[Any, Any]], host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serve `(add_fn, servicer)` pairs on host:port (0 = any); returns the server and the bound port."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    for add, servicer in servicers:
        add(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind gRPC on {host}:{port}")
    await server.start()
    return server, bound


async def start_health(host: str, port: int, ready: Any) -> web.AppRunner:
    """GET /health on the role's HTTP port (the pods' probes): 200 while `ready()` is true, else 503."""

    async def health(_: web.Request) -> web.Response:
        ok = bool(ready())
        return web.json_response({"status": "ok" if ok else "starting"}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
