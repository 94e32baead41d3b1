"""A pod's prefix-cache events, fanned out to the routers that subscribe (`KVEvents` in the proto).

The engine's block manager logs every hash it caches or evicts (`BlockManager.record_events`); one
publisher task drains that log every `interval_s` and hands each subscriber a batch. A new subscriber
first gets a snapshot (`reset` + every cached hash); one that falls behind (its queue full) gets a
fresh snapshot instead of the batches it missed. Routers therefore only ever see a late view of a
pod's cache, which costs a cache miss, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from kvfleet.dataplane.kvcache.keys import hash_to_bytes
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb


class KVEventHub:
    """Fan-out of one engine's prefix-cache events."""

    def __init__(self, engine: Any, interval_s: float = 0.05, max_queued_batches: int = 256) -> None:
        self.engine = engine  # AsyncLLMEngine
        self.interval_s = interval_s
        self.max_queued_batches = max_queued_batches
        self._subs: dict[asyncio.Queue[pb.KVEventBatch], bool] = {}  # queue -> lagging (needs a snapshot)
        self._publisher: asyncio.Task[None] | None = None

    def _batch(self, reset: bool, stored: list[int], removed: list[int]) -> pb.KVEventBatch:
        e = self.engine.engine
        return pb.KVEventBatch(reset=reset, stored=[hash_to_bytes(h) for h in stored],
                               removed=[hash_to_bytes(h) for h in removed],
                               block_size=e.scheduler.bm.block_size, extra_key=e.codec_key,
                               prefix_keys={v: e.prefix_key(v) for v in e.served_variants()},
                               shares_from={s.variant: s.from_variant for s in e.config.kv_sharing})

    async def _snapshot(self) -> pb.KVEventBatch:
        hashes = await self.engine.call(lambda e: list(e.scheduler.bm.hash_to_block))
        return self._batch(True, hashes, [])

    async def subscribe(self) -> AsyncIterator[pb.KVEventBatch]:
        """A snapshot, then deltas, until the caller stops iterating."""
        q: asyncio.Queue[pb.KVEventBatch] = asyncio.Queue(self.max_queued_batches)
        self._subs[q] = False
        if self._publisher is None or self._publisher.done():
            await self.engine.call(lambda e: e.scheduler.bm.record_events())
            self._publisher = asyncio.get_running_loop().create_task(self._publish())
        try:
            yield await self._snapshot()  # after registering: nothing between the two is lost
            while True:
                yield await q.get()
        finally:
            self._subs.pop(q, None)

    async def _publish(self) -> None:
        while self._subs:
            await asyncio.sleep(self.interval_s)
            reset, stored, removed = await self.engine.call(lambda e: e.scheduler.bm.drain_events())
            batch = self._batch(reset, stored, removed) if (reset or stored or removed) else None
            for q, lagging in list(self._subs.items()):
                if lagging:
                    with contextlib.suppress(asyncio.QueueEmpty):
                        while True:
                            q.get_nowait()
                    q.put_nowait(await self._snapshot())
                    self._subs[q] = False
                elif batch is not None:
                    if q.full():
                        self._subs[q] = True  # the next round sends it a snapshot instead
                    else:
                        q.put_nowait(batch)

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
