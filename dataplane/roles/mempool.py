"""The `mempool` role: the fleet's KV block store over gRPC (`Mempool` in rpc/kvfleet.proto).

    python -m kvfleet.dataplane.roles.mempool --config /etc/kvfleet/mempool.json [--host IP] [--grpc-port N]
    kvfleet dataplane --role mempool --config mempool.json

The operator renders mempool.json (operator/builders/config.py): `port`, `capacityBytesPerReplica`,
`highWatermark`, `blockSizeTokens`, `kvDtype`, and `pinning` (SLO class -> maxPinnedBytes, for the
classes with kvPinning enabled). The policy is `PoolStore`'s (mempool_store.py); this module maps it
onto gRPC: a refused call gets INVALID_ARGUMENT (malformed), RESOURCE_EXHAUSTED (over a limit) or
DATA_LOSS (a CRC mismatch) and the pool goes on serving. It holds blocks in memory only: a restarted
pool is empty (a new `PoolStats.instance`), and its clients treat every miss as "recompute".
/health on the HTTP port answers the pod's probes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from kvfleet.dataplane.pool_config import PoolConfig
from kvfleet.dataplane.roles.mempool_store import PoolEntry, PoolError, PoolStore, store_for
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

log = logging.getLogger("kvfleet.roles.mempool")

HTTP_PORT = 8080
STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
          "checksum": grpc.StatusCode.DATA_LOSS}


class MempoolService(pb_grpc.MempoolServicer):
    """`Mempool` over one `PoolStore`."""

    def __init__(self, store: PoolStore, block_size_tokens: int = 0, kv_dtype: str = "") -> None:
        self.store = store
        self.block_size_tokens, self.kv_dtype = block_size_tokens, kv_dtype
        self.instance = uuid.uuid4().hex  # a restart is an empty pool: clients see a new instance
        self.started = time.monotonic()
        # puts run here, off the event loop: the CRCs of a large put take milliseconds (zlib drops the GIL)
        self._put_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mempool-put")

    def close(self) -> None:
        self._put_threads.shutdown(wait=False, cancel_futures=True)

    async def _refuse(self, context: grpc.aio.ServicerContext, e: PoolError) -> None:
        await context.abort(STATUS[e.kind], str(e))

    async def Put(self, request_iterator: AsyncIterator[pb.PoolBlock],
                  context: grpc.aio.ServicerContext) -> pb.PutReply:
        head: pb.PoolBlock | None = None
        entries: list[PoolEntry] = []
        total = 0
        async for m in request_iterator:
            head = head or m
            entries.append(PoolEntry(m.block_hash, m.payload, m.crc32))
            total += len(m.payload)
            if total > self.store.max_call_bytes or len(entries) > self.store.max_keys:
                # refuse before buffering more of a call the store would refuse anyway
                self.store.count_rejected()
                await self._refuse(context, PoolError("too_large", f"a put of more than {self.store.max_keys} "
                                                      f"blocks or {self.store.max_call_bytes} bytes; split it"))
        if head is None:
            self.store.count_rejected()
            await self._refuse(context, PoolError("invalid", "an empty put"))
        assert head is not None
        try:
            res = await asyncio.get_running_loop().run_in_executor(
                self._put_threads, self.store.put, head.family, head.layout, entries, head.slo_class)
        except PoolError as e:
            await self._refuse(context, e)
        return pb.PutReply(stored=res.stored, present=res.present, dropped=res.dropped, pinned=res.pinned,
                           evicted=res.evicted, bytes=res.bytes)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PoolBlock]:
        try:
            run = self.store.get(request.family, request.layout, list(request.keys))
        except PoolError as e:
            await self._refuse(context, e)
        for e in run:
            yield pb.PoolBlock(block_hash=e.block_hash, payload=e.payload, crc32=e.crc32)

    async def Lookup(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.LookupReply:
        try:
            return pb.LookupReply(num_blocks=self.store.lookup(request.family, request.layout, list(request.keys)))
        except PoolError as e:
            await self._refuse(context, e)
            raise  # unreachable: abort raises

    async def Stats(self, request: pb.Empty, context: grpc.aio.ServicerContext) -> pb.PoolStats:
        return self.stats()

    def stats(self) -> pb.PoolStats:
        s = self.store
        used, pinned, blocks, pinned_blocks, c = s.snapshot()
        return pb.PoolStats(
            instance=self.instance, capacity_bytes=s.capacity_bytes, high_watermark=s.high_watermark,
            used_bytes=used, pinned_bytes=pinned, blocks=blocks, pinned_blocks=pinned_blocks, lookup_keys=c.lookup_keys, hit_keys=c.hit_keys,
            get_requests=c.get_requests, put_requests=c.put_requests, insertions=c.insertions,
            evictions=c.evictions, evicted_bytes=c.evicted_bytes, dropped=c.dropped, bytes_in=c.bytes_in,
            bytes_out=c.bytes_out, checksum_failures=c.checksum_failures, rejected_requests=c.rejected_requests,
            block_size_tokens=self.block_size_tokens, kv_dtype=self.kv_dtype,
            uptime_s=time.monotonic() - self.started)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvfleet dataplane --role mempool", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="mempool.json as the operator renders it")
    p.add_argument("--host", default=os.environ.get("POD_IP", "0.0.0.0"), help="bind address (default: $POD_IP)")
    p.add_argument("--grpc-port", type=int, default=None, help="default: the config's port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=int(os.environ.get("KVFLEET_HTTP_PORT", HTTP_PORT)),
                   help="/health for probes (0 = any free port)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, config: PoolConfig) -> None:
    from kvfleet.dataplane import tracing
    from kvfleet.dataplane.roles import wire

    service = MempoolService(store_for(config), config.block_size_tokens, config.kv_dtype)
    telemetry = tracing.configure("mempool")
    telemetry.observe_pool(service.stats)
    port = config.port if args.grpc_port is None else args.grpc_port
    server, bound = await wire.start_grpc([(pb_grpc.add_MempoolServicer_to_server, service)], args.host, port)
    health = await wire.start_health(args.host, args.http_port, lambda: True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    http = next((f"{a[0]}:{a[1]}" for a in health.addresses if isinstance(a, tuple)), "?")
    print(f"kvfleet mempool: /health on http://{http}", flush=True)
    print(f"kvfleet mempool: gRPC on {args.host}:{bound} (capacity {config.capacity_bytes} bytes, "
          f"high watermark {config.high_watermark}, pinning {dict(config.pinning)})", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=5.0)
        await health.cleanup()
        service.close()
        telemetry.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = PoolConfig.from_json(args.config.read_text())
    except (OSError, ValueError, TypeError) as e:
        print(f"kvfleet mempool: {args.config}: {e}", file=sys.stderr)
        return 2
    asyncio.run(serve(args, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
