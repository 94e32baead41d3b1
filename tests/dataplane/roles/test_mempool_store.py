"""The memory pool's store on its own: capacity and watermark, LRU by chain, pins, refusals, threads."""

from __future__ import annotations

import random
import threading

import pytest
from kvfleet.dataplane.kvcache.blocks import hash_block
from kvfleet.dataplane.kvcache.keys import PoolKey, checksum, hash_to_bytes
from kvfleet.dataplane.roles.mempool_store import PoolEntry, PoolError, PoolStore

FAM, LAYOUT = "smollm2", '{"kind":"PagedKVCache","block_size":16}'


def chain(n: int, seed: int = 0, size: int = 100, block_size: int = 4) -> list[PoolEntry]:
    """A prompt's blocks keyed exactly as the engine's prefix cache keys them (blocks.hash_block)."""
    rng = random.Random(seed)
    out, parent = [], None
    for _ in range(n):
        parent = hash_block(parent, [rng.randrange(32000) for _ in range(block_size)], "base")
        payload = rng.randbytes(size)
        out.append(PoolEntry(hash_to_bytes(parent), payload, checksum(payload)))
    return out


def keys(entries: list[PoolEntry]) -> list[bytes]:
    return [e.block_hash for e in entries]


def test_get_answers_the_longest_leading_run_in_order():
    store = PoolStore(capacity_bytes=10_000)
    blocks = chain(5)
    assert store.put(FAM, LAYOUT, blocks[:3]).stored == 3
    assert store.get(FAM, LAYOUT, keys(blocks)) == blocks[:3]
    assert store.lookup(FAM, LAYOUT, keys(blocks)) == 3
    store.put(FAM, LAYOUT, blocks[4:])  # a block past a gap is held but not reachable from the start
    assert store.get(FAM, LAYOUT, keys(blocks)) == blocks[:3]
    assert store.get(FAM, LAYOUT, keys(chain(2, seed=9))) == []
    c = store.counters
    assert (c.get_requests, c.lookup_keys, c.hit_keys, c.insertions) == (3, 12, 6, 4)


def test_family_and_layout_namespace_the_prefix_hash():
    store = PoolStore(capacity_bytes=10_000)
    blocks = chain(2)
    store.put(FAM, LAYOUT, blocks)
    assert store.get("other-family", LAYOUT, keys(blocks)) == []
    assert store.get(FAM, LAYOUT + "int8", keys(blocks)) == []
    assert PoolKey(FAM, LAYOUT, blocks[0].block_hash) in store


def test_a_duplicate_put_refreshes_and_does_not_count_twice():
    store = PoolStore(capacity_bytes=10_000)
    blocks = chain(3)
    store.put(FAM, LAYOUT, blocks)
    res = store.put(FAM, LAYOUT, blocks)
    assert (res.stored, res.present) == (0, 3) and store.used_bytes == 300 and store.counters.insertions == 3


def test_capacity_and_watermark_hold_under_a_flood_of_puts():
    store = PoolStore(capacity_bytes=100_000, high_watermark=0.8)
    rng = random.Random(1)
    for i in range(2000):
        res = store.put(FAM, LAYOUT, chain(rng.randint(1, 8), seed=i, size=rng.randint(50, 3000)))
        assert res.dropped == 0  # a full pool evicts, never refuses
        assert store.used_bytes <= 80_000
    store.check_invariants()
    c = store.counters
    assert c.evictions > 1000 and c.insertions - c.evictions == store.num_blocks
    assert c.bytes_in - c.evicted_bytes == store.used_bytes > 70_000  # evicts only down to the mark


def test_eviction_is_lru_and_takes_a_chain_tail_before_its_root():
    store = PoolStore(capacity_bytes=850, high_watermark=1.0)
    old, hot = chain(4, seed=1), chain(4, seed=2)
    store.put(FAM, LAYOUT, old)
    store.put(FAM, LAYOUT, hot)
    store.get(FAM, LAYOUT, keys(old))  # `old` is now the most recent
    store.put(FAM, LAYOUT, chain(1, seed=3))  # 800 + 100 > 850: one block goes, hot's tail
    assert store.get(FAM, LAYOUT, keys(hot)) == hot[:3]
    assert store.get(FAM, LAYOUT, keys(old)) == old


def test_pinned_classes_survive_pressure_within_their_cap():
    store = PoolStore(capacity_bytes=10_000, high_watermark=0.9, pin_caps={"gold": 1000})
    gold = chain(8, seed=100)  # 800 bytes, within the cap
    assert store.put(FAM, LAYOUT, gold, slo_class="gold").pinned == 8
    for i in range(500):  # 50x the pool of unpinned traffic
        store.put(FAM, LAYOUT, chain(5, seed=i), slo_class="bulk")
    assert store.get(FAM, LAYOUT, keys(gold)) == gold
    assert store.class_pinned_bytes("gold") == 800 and store.pinned_bytes == 800
    store.check_invariants()


def test_a_class_past_its_cap_keeps_its_hottest_prefixes_pinned():
    store = PoolStore(capacity_bytes=10_000, pin_caps={"gold": 500})
    first, second = chain(5, seed=1), chain(5, seed=2)
    store.put(FAM, LAYOUT, first, slo_class="gold")
    store.put(FAM, LAYOUT, second, slo_class="gold")  # demotes `first` to the LRU
    assert store.class_pinned_bytes("gold") == 500
    for i in range(300):
        store.put(FAM, LAYOUT, chain(5, seed=1000 + i))
    assert store.get(FAM, LAYOUT, keys(second)) == second and store.get(FAM, LAYOUT, keys(first)) == []
    store.check_invariants()


def test_pins_together_leave_room_to_evict_and_a_put_never_fails():
    store = PoolStore(capacity_bytes=1000, high_watermark=1.0, pin_caps={"a": 250, "b": 250})
    for i in range(20):
        store.put(FAM, LAYOUT, chain(3, seed=i), slo_class="ab"[i % 2])
        store.check_invariants()
    assert store.pinned_bytes == 400  # each class's 2 hottest 100-byte blocks
    assert store.put(FAM, LAYOUT, chain(4, seed=99)).dropped == 0
    with pytest.raises(ValueError, match="maxPinnedBytes"):  # more than half the mark: refused at start
        PoolStore(capacity_bytes=1000, high_watermark=1.0, pin_caps={"a": 300, "b": 300})


def test_a_put_larger_than_the_pool_keeps_what_fits_and_succeeds():
    store = PoolStore(capacity_bytes=1000, high_watermark=0.5)
    res = store.put(FAM, LAYOUT, chain(20, seed=5))  # 2000 bytes into a 500-byte mark
    assert res.stored == 20 and res.evicted == 15 and store.num_blocks == 5
    store.check_invariants()


@pytest.mark.parametrize("family, layout, entries, kind", [
    ("", LAYOUT, chain(1), "invalid"),
    (FAM, "", chain(1), "invalid"),
    (FAM, LAYOUT, [PoolEntry(b"short", b"x", checksum(b"x"))], "invalid"),
    (FAM, LAYOUT, [PoolEntry(bytes(16), b"", 0)], "invalid"),
    (FAM, LAYOUT, chain(1, size=9500), "too_large"),
    (FAM, LAYOUT, chain(3000, size=1), "too_large"),
    (FAM, LAYOUT, [PoolEntry(bytes(16), b"abc", 0)], "checksum"),
])
def test_malformed_oversized_and_corrupt_puts_are_refused_whole(family, layout, entries, kind):
    store = PoolStore(capacity_bytes=10_000, max_keys=2048)
    good = chain(2, seed=7)
    with pytest.raises(PoolError) as e:
        store.put(family, layout, good + entries)
    assert e.value.kind == kind
    assert store.num_blocks == 0 and store.counters.rejected_requests == 1
    assert store.put(FAM, LAYOUT, good).stored == 2  # and the store goes on


def test_gets_with_bad_keys_are_refused():
    store = PoolStore(capacity_bytes=10_000, max_keys=4)
    with pytest.raises(PoolError, match="16"):
        store.get(FAM, LAYOUT, [b"x" * 15])
    with pytest.raises(PoolError) as e:
        store.lookup(FAM, LAYOUT, [bytes(16)] * 5)
    assert e.value.kind == "too_large"


def test_concurrent_puts_and_gets_from_many_threads_keep_the_accounting():
    store = PoolStore(capacity_bytes=200_000, high_watermark=0.9, pin_caps={"gold": 20_000})
    shared = chain(10, seed=42, size=500)
    store.put(FAM, LAYOUT, shared, slo_class="gold")
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            rng = random.Random(n)
            for i in range(150):
                store.put(FAM, LAYOUT, chain(rng.randint(1, 6), seed=n * 1000 + i, size=rng.randint(100, 2000)),
                          slo_class=rng.choice(["gold", "", "bulk"]))
                got = store.get(FAM, LAYOUT, keys(shared))
                assert got == shared[:len(got)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store.check_invariants()
    c = store.counters
    assert c.put_requests == 1 + 16 * 150 and c.get_requests == 16 * 150
    assert c.insertions - c.evictions == store.num_blocks


def test_a_new_store_is_empty():
    assert PoolStore(capacity_bytes=1).num_blocks == 0
    with pytest.raises(ValueError):
        PoolStore(capacity_bytes=0)
    with pytest.raises(ValueError):
        PoolStore(capacity_bytes=10, high_watermark=1.5)
