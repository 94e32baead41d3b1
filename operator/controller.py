"""A coalescing work queue in front of the Reconciler (the client-go workqueue model, in asyncio).

Every trigger — a fleet created/updated/resumed, a referenced object changed, a
child changed or deleted, the periodic resync — only *enqueues* a key. Workers
take keys one at a time; a key is never reconciled twice concurrently, a key
enqueued while it is being reconciled runs once more afterwards, and a failure
is retried with exponential backoff. The blocking reconcile runs in a thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .reconciler import Reconciler, RetryableError

log = logging.getLogger("kvfleet.operator")

FLEET = "fleet"
REFS = "refs"  # usedByFleets of the referenced kinds in one namespace


@dataclass(frozen=True, order=True)
class Key:
    """What to reconcile: a fleet (kind=fleet, namespace, name) or a namespace's references (kind=refs)."""

    kind: str
    namespace: str
    name: str = ""


@dataclass
class Stats:
    """Counters and reconcile durations (seconds), for logs and the benchmark."""

    reconciles: int = 0
    failures: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=10000))


class Controller:
    """Queue + workers + periodic resync around one Reconciler."""

    def __init__(self, reconciler: Reconciler, workers: int = 8, resync_seconds: float = 60.0,
                 max_backoff: float = 60.0, gate: Callable[[], bool] | None = None):
        self.reconciler = reconciler
        self.gate = gate  # with peering: False while another replica is the active one
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.max_backoff = max_backoff
        self.known: set[Key] = set()
        self.stats = Stats()
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._requeue: dict[Key, float | None] = {}  # key -> reconcile again after (s), set by _run
        self._failures: dict[Key, int] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._enqueued_at: dict[Key, float] = {}
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")
        self._tasks: list[asyncio.Task[None]] = []

    # -- triggers ---------------------------------------------------------------------------------
    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        """Ask for a reconcile of `key` (coalesced with any pending request for it)."""
        if key.kind == FLEET:
            self.known.add(key)
        if delay > 0:
            if key not in self._timers and key not in self._queued:
                loop = asyncio.get_running_loop()
                self._timers[key] = loop.call_later(delay, self._fire, key)
            return
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._enqueued_at[key] = time.monotonic()
            self._queue.put_nowait(key)

    def forget(self, key: Key) -> None:
        """The fleet is gone: stop resyncing it."""
        self.known.discard(key)
        self._failures.pop(key, None)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.enqueue(key)

    # -- running ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the workers and the resync loop on the running event loop."""
        for i in range(self.workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"kvfleet-worker-{i}"))
        self._tasks.append(asyncio.create_task(self._resync(), name="kvfleet-resync"))

    async def stop(self) -> None:
        """Cancel the workers, timers and resync loop (in-flight reconciles finish in their threads)."""
        for handle in self._timers.values():
            handle.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            for key in sorted(self.known):
                self.enqueue(key)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            if self.gate is not None and not await loop.run_in_executor(self._executor, self.gate):
                self.enqueue(key, delay=max(1.0, min(self.resync_seconds, 5.0)))  # standby: look again later
                continue
            self._active.add(key)
            start = time.monotonic()
            ok = False
            try:
                if await loop.run_in_executor(self._executor, self._run, key):
                    self.forget(key)
                elif (again := self._requeue.pop(key, None)) is not None:
                    self.enqueue(key, delay=again)
                ok = True
            except RetryableError as exc:
                log.warning("reconcile of %s failed, will retry: %s", key, exc)
            except Exception:  # noqa: BLE001 - a worker must survive any bug in one reconcile
                log.exception("reconcile of %s failed, will retry", key)
            finally:
                self._active.discard(key)
                took = time.monotonic() - start
                self.stats.durations.append(took)
                self.stats.reconciles += 1
                waited = start - self._enqueued_at.pop(key, start)
                log.debug("reconciled %s in %.3fs after %.3fs in the queue", key, took, waited)
            if ok:
                self._failures.pop(key, None)
            else:
                self.stats.failures += 1
                n = self._failures[key] = self._failures.get(key, 0) + 1
                self.enqueue(key, delay=min(self.max_backoff, 0.5 * 2 ** min(n, 10)))
            if key in self._dirty:
                self._dirty.discard(key)
                self.enqueue(key)

    def _run(self, key: Key) -> bool:
        """Reconcile one key (in a worker thread); True when the fleet no longer exists."""
        if key.kind == REFS:
            self.reconciler.sync_references(key.namespace)
            return False
        outcome = self.reconciler.reconcile(key.namespace, key.name)
        if outcome.deleted or outcome.manual_scales:
            log.info("fleet %s/%s: removed %s, reverted %d manual scale(s)", key.namespace, key.name,
                     outcome.deleted, len(outcome.manual_scales))
        self._requeue[key] = outcome.requeue_after  # the autoscaling timer of this fleet (read on the loop)
        return outcome.gone
