"""Prefill and decode over the memory pool: take a prompt's blocks from the pool before computing,
offer the blocks computed here after (write-behind).

    access = PoolAccess(engine, GrpcPoolClient(timeout_s=2.0), family="smollm2")
    got = await access.fetch(request, shards)      # pool blocks -> this engine's prefix cache
    ... engine.generate(request) ...                # takes them as ordinary prefix-cache hits
    access.offer(handoff, shards, got, slo_class)   # a background Put; the request never waits for it

A prompt's blocks all live on one shard, `shards[root % len(shards)]` with `root` its first block's
hash: Get answers leading runs, and every pod picks the same shard without talking to the others.
The pool is a cache: an error, a restart or a slow answer costs a recompute, never the request.
A fetched block whose CRC or hash does not match is not used (the run stops there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvfleet.dataplane.engine.api import GenerationRequest, KVHandoff
from kvfleet.dataplane.engine.handoff import import_blocks, num_cached_blocks, prompt_block_hashes
from kvfleet.dataplane.kvcache.keys import checksum
from kvfleet.dataplane.roles.pool_client import PoolBlock, PoolClient
from kvfleet.dataplane.roles.transport import CallError

log = logging.getLogger(__name__)


def shard_for(root_hash: int, shards: Sequence[str]) -> str:
    """The pool shard that holds every block of the chain starting with `root_hash`."""
    return shards[root_hash % len(shards)]


@dataclass(frozen=True)
class PoolFetch:
    """What one fetch found: leading blocks cached here already, then blocks taken from the pool."""

    local_blocks: int = 0
    pool_blocks: int = 0

    @property
    def known_in_pool(self) -> int:
        """Leading blocks not worth offering again (local hits were offered when first computed)."""
        return self.local_blocks + self.pool_blocks


class PoolAccess:
    """One engine's use of the fleet's pool; counters for its pod's `Stats`."""

    def __init__(self, engine: Any, client: PoolClient, family: str, timeout_s: float = 2.0,
                 max_pending_puts: int = 4) -> None:
        self.engine = engine  # AsyncLLMEngine
        self.client = client
        self.family = family
        self.timeout_s = timeout_s
        self.max_pending_puts = max_pending_puts
        # an evicting policy keeps no reusable prefix (its slots stop holding the chain's tokens); a policy
        # with full-precision sinks takes a hit only with the sinks' rows, which stay local (kvcache stash)
        kv = engine.engine.worker.kv
        self.disabled_because = ("the CachePolicy evicts tokens" if engine.engine.evictor is not None else
                                 "the CachePolicy keeps full-precision sink tokens, which the pool does not carry yet"
                                 if getattr(kv, "sink_tokens", 0) and getattr(kv, "lanes", None) is not None else "")
        self.enabled = not self.disabled_because
        if self.disabled_because:
            log.warning("memory pool not used: %s", self.disabled_because)
        self.layout = engine.engine.kv_layout
        self._pending: set[asyncio.Task[None]] = set()
        self.blocks_fetched = self.bytes_fetched = self.blocks_offered = 0
        self.errors = self.checksum_failures = self.offers_dropped = 0

    async def fetch(self, request: GenerationRequest, shards: Sequence[str]) -> PoolFetch:
        """Cache the pool's leading run of the prompt's blocks beyond what this engine holds."""
        if not shards or not self.enabled:
            return PoolFetch()
        def hashes_and_held(e: Any) -> tuple[list[int], int]:
            hashes = prompt_block_hashes(e, request)
            return hashes, num_cached_blocks(e, hashes)

        hashes, local = await self.engine.call(hashes_and_held)  # one trip to the engine thread
        if local == len(hashes):
            return PoolFetch(local, 0)
        want = hashes[local:]
        try:
            got = await asyncio.wait_for(self.client.get(shard_for(hashes[0], shards), self.family, self.layout,
                                                         want), self.timeout_s)
        except (TimeoutError, CallError) as e:
            self.errors += 1
            log.info("pool get failed (%s); computing the prompt", e)
            return PoolFetch(local, 0)
        good: list[tuple[int, bytes]] = []
        for h, blk in zip(want, got, strict=False):
            if blk.block_hash != h or checksum(blk.payload) != blk.crc32:
                self.checksum_failures += 1
                break
            good.append((h, blk.payload))
        imported = await self.engine.call(lambda e: import_blocks(e, good)) if good else 0
        self.blocks_fetched += len(good)
        self.bytes_fetched += sum(len(p) for _, p in good)
        return PoolFetch(local, imported)

    def offer(self, kv: KVHandoff, shards: Sequence[str], fetched: PoolFetch, slo_class: str = "") -> None:
        """Put the prompt's full blocks the pool may lack, in the background (dropped when too many are
        pending: the pool is an optimisation, never a queue)."""
        if not shards or not self.enabled:
            return
        blocks = [PoolBlock(b.block_hash, b.payload, b.crc32) for b in kv.blocks
                  if b.block_hash is not None and b.index >= fetched.known_in_pool]
        root = kv.blocks[0].block_hash if kv.blocks else None
        if not blocks or root is None:
            return
        if len(self._pending) >= self.max_pending_puts:
            self.offers_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._put(shard_for(root, shards), blocks, slo_class))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(self, address: str, blocks: list[PoolBlock], slo_class: str) -> None:
        try:
            await self.client.put(address, self.family, self.layout, blocks, slo_class)
            self.blocks_offered += len(blocks)
        except CallError as e:
            self.errors += 1
            log.info("pool put to %s failed (%s)", address, e)

    async def drain(self) -> None:
        """Wait for the offers in flight (shutdown, tests)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def stats(self) -> dict[str, int]:
        """The pod's pool counters as `RoleStats` fields."""
        return {"pool_blocks_fetched": self.blocks_fetched, "pool_bytes_fetched": self.bytes_fetched,
                "pool_blocks_offered": self.blocks_offered, "pool_errors": self.errors,
                "pool_checksum_failures": self.checksum_failures}
