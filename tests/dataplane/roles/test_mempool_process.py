"""The mempool role as the pod runs it: `python -m kvfleet.dataplane.roles.mempool --config mempool.json`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from kvfleet.dataplane.kvcache.blocks import hash_block
from kvfleet.dataplane.kvcache.keys import checksum
from kvfleet.dataplane.roles import cli
from kvfleet.dataplane.roles.pool_client import GrpcPoolClient, PoolBlock
from roles_testlib import RoleProcess

FAM, LAYOUT = "smollm2", '{"kind":"PagedKVCache","block_size":16}'


def rendered(tmp: Path) -> Path:
    """mempool.json in the shape operator/builders/config.py renders (tests/operator checks the real one)."""
    path = tmp / "mempool.json"
    path.write_text(json.dumps({"fleet": "chat", "port": 50052, "replicas": 1, "capacityBytesPerReplica": 64 << 10,
                                "highWatermark": 0.5, "blockSizeTokens": 16, "kvDtype": "int8",
                                "pinning": {"interactive": 4096}}))
    return path


def blocks(seed: int, n: int, size: int = 1024) -> list[PoolBlock]:
    out, parent = [], None
    for i in range(n):
        parent = hash_block(parent, list(range(seed * 1000 + i * 16, seed * 1000 + i * 16 + 16)), "base")
        payload = bytes([seed % 256, i % 256]) * (size // 2)
        out.append(PoolBlock(parent, payload, checksum(payload)))
    return out


def test_the_role_serves_put_get_stats_from_a_rendered_config_and_stops_on_sigterm(tmp_path: Path):
    argv = [sys.executable, "-m", "kvfleet.dataplane.roles.mempool", "--config", str(rendered(tmp_path)),
            "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"]
    pool = RoleProcess("mempool", argv, tmp_path / "mempool.log", r"gRPC on (\S+:\d+)").start()
    try:
        pool.wait_ready(timeout=60)
        health = re.search(r"/health on (http://\S+)", pool.log.read_text()).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(f"{health}/health", timeout=5) as r:
            assert r.status == 200

        async def main() -> None:
            client = GrpcPoolClient()
            try:
                gold = blocks(1, 4)
                assert (await client.put(pool.address, FAM, LAYOUT, gold, slo_class="interactive")).pinned == 4
                for seed in range(2, 12):  # 10 x 8 KiB into a 32 KiB high mark
                    reply = await client.put(pool.address, FAM, LAYOUT, blocks(seed, 8))
                    assert reply.dropped == 0
                assert await client.get(pool.address, FAM, LAYOUT, [b.block_hash for b in gold]) == gold
                s = await client.stats(pool.address)
                assert s.used_bytes <= 32 << 10 and s.evictions > 0 and s.pinned_bytes == 4096
                assert (s.capacity_bytes, s.high_watermark, s.block_size_tokens, s.kv_dtype) == (64 << 10, 0.5, 16,
                                                                                                   "int8")
                assert s.hit_keys == 4 and s.insertions == 4 + 80
            finally:
                await client.close()

        asyncio.run(main())
    finally:
        code = pool.stop()
    assert code == 0, pool.log.read_text()


def test_a_bad_config_fails_fast_with_the_reason(tmp_path: Path):
    path = tmp_path / "mempool.json"
    path.write_text(json.dumps({"capacityBytesPerReplica": 1024, "lowWatermark": 0.5}))
    out = subprocess.run([sys.executable, "-m", "kvfleet.dataplane.roles.mempool", "--config", str(path),
                          "--grpc-port", "0", "--http-port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown keys ['lowWatermark']" in out.stderr and "Traceback" not in out.stderr


def test_the_role_is_registered_and_imports_no_torch():
    assert "mempool" in cli.ROLES
    with pytest.raises(SystemExit) as e:
        cli.main(["--role", "mempool", "--help"])
    assert e.value.code == 0
    code = "import sys, kvfleet.dataplane.roles.mempool, kvfleet.dataplane.roles.pool_client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
