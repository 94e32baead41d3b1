"""Memory pool throughput: the store alone, and Put/Get over gRPC on loopback (one process, one core's worth).

    PYTHONSAFEPATH=1 .venv/bin/python bench/mempool.py     # writes bench/results/mempool.{json,md}

Store: puts of 16 blocks per call into a 256 MiB pool at a 0.9 high watermark (so large blocks evict
throughout), then gets of 16-block runs. gRPC: 250 concurrent Put calls of 16 blocks from one
`GrpcPoolClient`, then the same Gets. Payloads are random bytes with their CRC-32 (the store checks it).
A recorded benchmark, not a test; the machine and its load are written with the numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from pathlib import Path

from kvfleet.dataplane.kvcache.keys import checksum
from kvfleet.dataplane.roles import wire
from kvfleet.dataplane.roles.mempool import MempoolService
from kvfleet.dataplane.roles.mempool_store import PoolEntry, PoolStore
from kvfleet.dataplane.roles.pool_client import GrpcPoolClient, PoolBlock
from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

OUT = Path(__file__).resolve().parent / "results"


def store_rows() -> list[dict[str, object]]:
    rows = []
    for size in (4 << 10, 64 << 10, 512 << 10):
        store = PoolStore(capacity_bytes=256 << 20, high_watermark=0.9)
        payload = os.urandom(size)
        crc = checksum(payload)
        n = min(20000, max(2000, (512 << 20) // size))
        entries = [PoolEntry(i.to_bytes(16, "little"), payload, crc) for i in range(n)]
        t = time.perf_counter()
        for i in range(0, n, 16):
            store.put("family", "layout", entries[i:i + 16])
        put_s = time.perf_counter() - t
        keys = [e.block_hash for e in entries[-2000:]]
        t = time.perf_counter()
        for i in range(0, len(keys), 16):
            store.get("family", "layout", keys[i:i + 16])
        get_s = time.perf_counter() - t
        rows.append({"path": "store", "block_bytes": size, "blocks": n, "put_blocks_per_s": round(n / put_s),
                     "put_gib_per_s": round(n * size / put_s / 2**30, 2), "get_blocks_per_s": round(len(keys) / get_s),
                     "evictions": store.counters.evictions})
    return rows


async def grpc_rows() -> list[dict[str, object]]:
    svc = MempoolService(PoolStore(capacity_bytes=256 << 20))
    server, port = await wire.start_grpc([(pb_grpc.add_MempoolServicer_to_server, svc)], "127.0.0.1", 0)
    address, rows = f"127.0.0.1:{port}", []
    try:
        for size in (4 << 10, 64 << 10):
            payload = os.urandom(size)
            blocks = [PoolBlock(size + i, payload, checksum(payload)) for i in range(4000)]
            client = GrpcPoolClient()
            t = time.perf_counter()
            await asyncio.gather(*(client.put(address, "family", "layout", blocks[i:i + 16])
                                   for i in range(0, len(blocks), 16)))
            put_s = time.perf_counter() - t
            t = time.perf_counter()
            got = await asyncio.gather(*(client.get(address, "family", "layout", [b.block_hash for b in blocks[i:i + 16]])
                                         for i in range(0, len(blocks), 16)))
            get_s = time.perf_counter() - t
            await client.close()
            rows.append({"path": "grpc", "block_bytes": size, "blocks": len(blocks),
                         "put_blocks_per_s": round(len(blocks) / put_s),
                         "put_gib_per_s": round(len(blocks) * size / put_s / 2**30, 3),
                         "get_blocks_per_s": round(sum(map(len, got)) / get_s), "evictions": svc.store.counters.evictions})
    finally:
        await server.stop(0)
    return rows


def main() -> None:
    rows = store_rows() + asyncio.run(grpc_rows())
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "load1": round(os.getloadavg()[0], 2),
           "python": platform.python_version()}
    OUT.mkdir(exist_ok=True)
    (OUT / "mempool.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = [f"# Memory pool throughput ({env})", "", "| path | block | blocks | put blocks/s | put GiB/s | "
             "get blocks/s | evictions |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {int(r['block_bytes']) >> 10} KiB | {r['blocks']} | {r['put_blocks_per_s']} | "  # type: ignore[call-overload]
                     f"{r['put_gib_per_s']} | {r['get_blocks_per_s']} | {r['evictions']} |")
    (OUT / "mempool.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
