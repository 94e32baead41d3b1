"""The memory pool's store: KV blocks by `PoolKey`, byte-accounted, LRU past a high watermark, per-class pins.

Pure and torch-free (the role, the tests and a benchmark use it without sockets); thread-safe (one lock).
`PoolConfig` is mempool.json, read here so the operator can check what it renders with the pool's own rules.

    store = PoolStore(capacity_bytes=8 << 30, high_watermark=0.9, pin_caps={"interactive": 1 << 30})
    store.put(family, layout, [PoolEntry(hash16, payload, crc)], slo_class="interactive")
    run = store.get(family, layout, [hash16, ...])       # the longest leading run held, in order

Accounting is payload bytes. After every put `used_bytes <= capacity_bytes * high_watermark` (the
"high" mark): a put that crosses it evicts least recently used unpinned blocks until it holds
again (Mooncake's shape: start evicting at ~90%, never refuse for want of room). The room between
the high mark and the capacity is slack for the blocks of calls still arriving.

Pinning (SLOClass `kvPinning`): a block put by a class with a cap is pinned while that class's
pinned bytes stay within its cap; past it, the class's least recently used pinned blocks are
demoted to the ordinary LRU, so a class keeps its *hottest* prefixes resident. All pins together
never exceed `MAX_PINNED_FRACTION` of the high mark, so a flood of pinned puts still leaves room to
evict. A block that cannot be kept even then (everything else pinned) is dropped, counted, and the
put still succeeds: the pool is a cache.

NOTE: a prefix is only usable from its first block, so recency is refreshed tail first: after a
put or a get of a run, its first block is the most recently used and an eviction takes a
chain's tail before its root (vLLM frees blocks tail first for the same reason).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvfleet.dataplane.kvcache.keys import HASH_BYTES, PoolKey, checksum
from kvfleet.dataplane.pool_config import PoolConfig, check_pool_numbers


class PoolError(ValueError):
    """A request the pool refuses as a whole (nothing of it is stored). `kind` names the gRPC status."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "invalid" | "too_large" | "checksum"


@dataclass(frozen=True)
class PoolEntry:
    """One block as stored: its prefix hash (16 bytes), payload as the engine stores it, CRC-32."""

    block_hash: bytes
    payload: bytes
    crc32: int


@dataclass
class PutResult:
    stored: int = 0
    present: int = 0
    dropped: int = 0
    pinned: int = 0
    evicted: int = 0
    bytes: int = 0


@dataclass
class _Slot:
    entry: PoolEntry
    pinned_by: str | None = None  # the class holding a pin on it


@dataclass
class PoolCounters:
    """Monotonic counters since start (PoolStats)."""

    lookup_keys: int = 0
    hit_keys: int = 0
    get_requests: int = 0
    put_requests: int = 0
    insertions: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    dropped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    checksum_failures: int = 0
    rejected_requests: int = 0


@dataclass
class PoolStore:
    """Blocks by (family, layout, prefix hash); see the module docstring for the policy."""

    capacity_bytes: int
    high_watermark: float = 0.9
    pin_caps: dict[str, int] = field(default_factory=dict)  # SLO class -> max pinned bytes
    max_block_bytes: int = 16 << 20
    max_call_bytes: int = 256 << 20
    max_keys: int = 8192

    def __post_init__(self) -> None:
        self.max_pinned_bytes = check_pool_numbers(self.capacity_bytes, self.high_watermark, self.pin_caps)
        self.high_bytes = int(self.capacity_bytes * self.high_watermark)
        self.max_block_bytes = min(self.max_block_bytes, self.high_bytes)
        self.used_bytes = 0
        self.pinned_bytes = 0
        self.counters = PoolCounters()
        self._slots: dict[PoolKey, _Slot] = {}
        self._lru: OrderedDict[PoolKey, None] = OrderedDict()  # unpinned; head = evicted first
        self._pins: dict[str, OrderedDict[PoolKey, None]] = {}  # class -> its pinned blocks, LRU order
        self._class_pinned: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- the three operations -------------------------------------------------------------------

    def put(self, family: str, layout: str, entries: Sequence[PoolEntry], slo_class: str = "") -> PutResult:
        """Keep `entries` (a prompt's blocks, in chain order). Raises `PoolError` and stores nothing
        for a malformed, oversized or corrupt call; never for want of room."""
        try:
            self._check_put(family, layout, entries)
        except PoolError:
            with self._lock:
                self.counters.rejected_requests += 1
            raise
        res = PutResult(bytes=sum(len(e.payload) for e in entries))
        with self._lock:
            self.counters.put_requests += 1
            kept: list[PoolKey] = []
            for e in entries:
                key = PoolKey(family, layout, e.block_hash)
                if key in self._slots:
                    res.present += 1
                    self._touch(key)  # so this call's own inserts evict it last
                elif self._make_room(len(e.payload), res):
                    self._slots[key] = _Slot(e)
                    self._lru[key] = None
                    self.used_bytes += len(e.payload)
                    self.counters.insertions += 1
                    self.counters.bytes_in += len(e.payload)
                    res.stored += 1
                else:
                    res.dropped += 1
                    self.counters.dropped += 1
                    continue
                kept.append(key)
            for key in reversed(kept):  # tail first: the chain's root ends most recent
                if key not in self._slots:
                    continue  # evicted by a later block of this same call (a put larger than the pool)
                self._touch(key)
                if self._pin(key, slo_class, res):
                    res.pinned += 1
        return res

    def get(self, family: str, layout: str, hashes: Sequence[bytes]) -> list[PoolEntry]:
        """The longest leading run of `hashes` held, in order; refreshes its recency."""
        self._check_keys(family, layout, hashes)
        with self._lock:
            run = self._run(family, layout, hashes)
            self.counters.get_requests += 1
            self.counters.lookup_keys += len(hashes)
            self.counters.hit_keys += len(run)
            for key in reversed(run):
                self._touch(key)
            out = [self._slots[k].entry for k in run]
            self.counters.bytes_out += sum(len(e.payload) for e in out)
            return out

    def lookup(self, family: str, layout: str, hashes: Sequence[bytes]) -> int:
        """How many leading `hashes` are held (no side effects: routing asks, it does not use)."""
        self._check_keys(family, layout, hashes)
        with self._lock:
            return len(self._run(family, layout, hashes))

    def count_rejected(self) -> None:
        """Count a call refused before it reached the store (the service stops reading an oversized put)."""
        with self._lock:
            self.counters.rejected_requests += 1

    # -- views ----------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self._slots)

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(p) for p in self._pins.values())

    def snapshot(self) -> tuple[int, int, int, int, PoolCounters]:
        """(used bytes, pinned bytes, blocks, pinned blocks, counters) at one instant (puts run on other threads)."""
        with self._lock:
            return (self.used_bytes, self.pinned_bytes, len(self._slots), self.num_pinned_blocks,
                    dataclasses.replace(self.counters))

    def class_pinned_bytes(self, slo_class: str) -> int:
        return self._class_pinned.get(slo_class, 0)

    def __contains__(self, key: PoolKey) -> bool:
        return key in self._slots

    def check_invariants(self) -> None:
        """Raise AssertionError if the accounting is inconsistent (tests)."""
        with self._lock:
            assert self.used_bytes == sum(len(s.entry.payload) for s in self._slots.values())
            assert self.used_bytes <= self.high_bytes <= self.capacity_bytes, (self.used_bytes, self.high_bytes)
            pinned = {k for p in self._pins.values() for k in p}
            assert pinned.isdisjoint(self._lru) and pinned | set(self._lru) == set(self._slots)
            assert self.pinned_bytes == sum(self._class_pinned.values()) <= self.max_pinned_bytes
            for cls, keys in self._pins.items():
                assert all(self._slots[k].pinned_by == cls for k in keys)
                assert self._class_pinned[cls] == sum(len(self._slots[k].entry.payload) for k in keys)
                assert self._class_pinned[cls] <= self.pin_caps.get(cls, 0)

    # -- internals (lock held) ------------------------------------------------------------------

    def _check_keys(self, family: str, layout: str, hashes: Sequence[bytes]) -> None:
        try:
            if not family or not layout:
                raise PoolError("invalid", "family and layout are required")
            if len(hashes) > self.max_keys:
                raise PoolError("too_large", f"{len(hashes)} keys in one call; the pool takes at most {self.max_keys}")
            _check_hashes(hashes)
        except PoolError:
            with self._lock:
                self.counters.rejected_requests += 1
            raise

    def _check_put(self, family: str, layout: str, entries: Sequence[PoolEntry]) -> None:
        if not family or not layout:
            raise PoolError("invalid", "the first block of a put must name its family and layout")
        if len(entries) > self.max_keys:
            raise PoolError("too_large", f"{len(entries)} blocks in one put; the pool takes at most {self.max_keys}")
        _check_hashes([e.block_hash for e in entries])
        total = 0
        for i, e in enumerate(entries):
            if not e.payload:
                raise PoolError("invalid", f"block {i} has an empty payload")
            if len(e.payload) > self.max_block_bytes:
                raise PoolError("too_large", f"block {i} is {len(e.payload)} bytes; the pool keeps blocks of at "
                                             f"most {self.max_block_bytes}")
            total += len(e.payload)
            if total > self.max_call_bytes:
                raise PoolError("too_large", f"a put of more than {self.max_call_bytes} bytes; split it")
            if checksum(e.payload) != e.crc32:
                with self._lock:
                    self.counters.checksum_failures += 1
                raise PoolError("checksum", f"block {i}'s CRC-32 does not match its payload")

    def _run(self, family: str, layout: str, hashes: Iterable[bytes]) -> list[PoolKey]:
        run = []
        for h in hashes:
            key = PoolKey(family, layout, h)
            if key not in self._slots:
                break
            run.append(key)
        return run

    def _touch(self, key: PoolKey) -> None:
        cls = self._slots[key].pinned_by
        (self._lru if cls is None else self._pins[cls]).move_to_end(key)

    def _make_room(self, size: int, res: PutResult) -> bool:
        """Evict LRU unpinned blocks until `size` more bytes stay within the high mark."""
        while self.used_bytes + size > self.high_bytes:
            if not self._lru:
                return False
            key, _ = self._lru.popitem(last=False)
            slot = self._slots.pop(key)
            n = len(slot.entry.payload)
            self.used_bytes -= n
            self.counters.evictions += 1
            self.counters.evicted_bytes += n
            res.evicted += 1
        return True

    def _pin(self, key: PoolKey, slo_class: str, res: PutResult) -> bool:
        """Pin `key` for `slo_class` if the class pins; demote its coldest pins to make room. True if pinned."""
        slot = self._slots[key]
        cap = self.pin_caps.get(slo_class, 0)
        if slot.pinned_by is not None:
            return slot.pinned_by == slo_class
        size = len(slot.entry.payload)
        if cap <= 0 or size > cap:
            return False
        pins = self._pins.setdefault(slo_class, OrderedDict())
        while pins and self._class_pinned.get(slo_class, 0) + size > cap:
            self._unpin(next(iter(pins)))  # the class's coldest pin goes back to the LRU
        if self.pinned_bytes + size > self.max_pinned_bytes:
            return False  # the classes' pins together hold the whole pin budget
        del self._lru[key]
        pins[key] = None
        slot.pinned_by = slo_class
        self._class_pinned[slo_class] = self._class_pinned.get(slo_class, 0) + size
        self.pinned_bytes += size
        return True

    def _unpin(self, key: PoolKey) -> None:
        slot = self._slots[key]
        assert slot.pinned_by is not None
        del self._pins[slot.pinned_by][key]
        size = len(slot.entry.payload)
        self._class_pinned[slot.pinned_by] -= size
        self.pinned_bytes -= size
        slot.pinned_by = None
        self._lru[key] = None  # NOTE: demoted to the most recent end: it was hot recently enough to be pinned


def _check_hashes(hashes: Iterable[bytes]) -> None:
    for i, h in enumerate(hashes):
        if len(h) != HASH_BYTES:
            raise PoolError("invalid", f"key {i} is {len(h)} bytes; a block's prefix hash is {HASH_BYTES}")


def store_for(config: PoolConfig) -> PoolStore:
    """The store a pool replica runs with `config` (mempool.json)."""
    return PoolStore(capacity_bytes=int(config.capacity_bytes), high_watermark=float(config.high_watermark),
                     pin_caps={str(k): int(v) for k, v in config.pinning.items()},
                     max_block_bytes=int(config.max_block_bytes))
