"""BlockManager: refcounts, LRU of cached free blocks, hash-chain prefix reuse."""

import subprocess
import sys

import pytest
from kvfleet.dataplane.kvcache.blocks import BlockManager, extend_block_hashes, hash_block

BS = 4


def _hashes(tokens, extra=""):
    h: list[int] = []
    extend_block_hashes(h, tokens, len(tokens), BS, extra)
    return h


def _run(bm, tokens, extra=""):
    """Allocate a sequence with prefix hits, 'compute' it, cache its full blocks."""
    hashes = _hashes(tokens, extra)
    hits = bm.match_prefix(hashes, (len(tokens) - 1) // BS)
    table: list[int] = []
    assert bm.allocate(table, len(tokens), hits)
    bm.cache_blocks(table, hashes, len(tokens))
    bm.check_invariants()
    return table, hits


def test_hash_is_chained_and_stable():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])  # stable (blake2b, not hash())
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], "v1") != a
    assert len(_hashes(list(range(10)))) == 2  # only full blocks


def test_allocate_free_no_leaks_and_never_negative():
    bm = BlockManager(8, BS)
    t1: list[int] = []
    assert bm.allocate(t1, 9)  # 3 blocks
    assert len(t1) == 3 and bm.num_free_blocks == 5
    assert bm.allocate(t1, 12) and len(t1) == 3  # still fits
    assert bm.allocate(t1, 13) and len(t1) == 4
    t2: list[int] = []
    assert not bm.allocate(t2, 5 * BS)  # too big: no change
    assert t2 == [] and bm.num_free_blocks == 4
    bm.free(t1)
    assert t1 == [] and bm.num_free_blocks == 8
    bm.check_invariants()
    with pytest.raises(AssertionError):
        bm.free([0])  # refcount would go negative


def test_prefix_reuse_across_requests_and_refcounts():
    bm = BlockManager(16, BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    t1, hits1 = _run(bm, prompt)
    assert hits1 == []
    t2, hits2 = _run(bm, prompt + [99, 98])
    assert hits2 == t1[:2]  # shared full blocks
    assert bm.ref_counts[t1[0]] == 2
    bm.free(list(t1))
    assert bm.ref_counts[t2[0]] == 1
    bm.free(list(t2))
    bm.check_invariants()
    assert bm.num_free_blocks == 16
    # refcount-0 blocks keep their hashes: a third request still hits
    _, hits3 = _run(bm, prompt)
    assert hits3 == t1[:2]


def test_last_token_is_never_a_hit():
    bm = BlockManager(16, BS)
    prompt = list(range(8))  # exactly 2 full blocks
    t1, _ = _run(bm, prompt)
    bm.free(list(t1))
    _, hits = _run(bm, prompt)
    assert len(hits) == 1  # the second block is recomputed so the last token yields logits


def test_variant_isolates_prefix_hits():
    bm = BlockManager(16, BS)
    prompt = list(range(12))
    t1, _ = _run(bm, prompt, extra="base")
    _, hits_other = _run(bm, prompt, extra="finetune")
    assert hits_other == []
    _, hits_same = _run(bm, prompt, extra="base")
    assert hits_same == t1[:2]


def test_lru_eviction_order_of_cached_free_blocks():
    bm = BlockManager(6, BS)
    a, _ = _run(bm, [1] * 8 + [0])  # blocks a0 a1 (+ partial)
    b, _ = _run(bm, [2] * 8 + [0])
    bm.free(list(a))  # freed first = least recently used
    bm.free(list(b))
    # the uncached partial blocks are reused first, then a's blocks (LRU), b's survive
    t: list[int] = []
    assert bm.allocate(t, 4 * BS)
    assert set(t) == {a[2], b[2], a[0], a[1]}
    assert bm.num_evictions == 2
    _, hits_a = _run_probe(bm, [1] * 8 + [0])
    _, hits_b = _run_probe(bm, [2] * 8 + [0])
    assert hits_a == [] and hits_b == b[:2]
    # a hit refreshes recency: reuse b, free it, then b is the most recent
    bm.free(list(t))
    bm.check_invariants()


def _run_probe(bm, tokens):
    hashes = _hashes(tokens)
    return None, bm.match_prefix(hashes, (len(tokens) - 1) // BS)


def test_tail_blocks_evicted_before_head_blocks():
    bm = BlockManager(4, BS)
    a, _ = _run(bm, list(range(12)) + [0])  # 3 cached full blocks + 1 partial
    bm.free(list(a))
    t: list[int] = []
    assert bm.allocate(t, 2 * BS)  # partial (uncached) first, then the LAST cached block
    assert set(t) == {a[3], a[2]}
    _, hits = _run_probe(bm, list(range(12)) + [0])
    assert hits == a[:2]


def test_duplicate_hash_keeps_first_mapping():
    bm = BlockManager(8, BS)
    prompt = list(range(5))
    h = _hashes(prompt)
    t1: list[int] = []
    t2: list[int] = []
    assert bm.allocate(t1, 5) and bm.allocate(t2, 5)  # computed concurrently, no hits
    bm.cache_blocks(t1, h, 5)
    bm.cache_blocks(t2, h, 5)
    assert bm.hash_to_block[h[0]] == t1[0] and bm.block_hash[t2[0]] is None
    bm.free(list(t1))
    bm.free(list(t2))
    bm.check_invariants()


def test_blocks_module_is_torch_free():
    code = "import sys, kvfleet.dataplane.kvcache.blocks; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_events_report_what_is_cached_and_evicted_and_overflow_becomes_a_snapshot():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.record_events(limit=8)
    assert bm.drain_events() == (True, [], [])  # the first drain is a snapshot
    table: list[int] = []
    assert bm.allocate(table, 4)
    bm.cache_blocks(table, [11, 12], 4)
    assert bm.drain_events() == (False, [11, 12], [])
    bm.free(table)
    other: list[int] = []
    assert bm.allocate(other, 8)  # needs every block: both cached ones are evicted
    reset, stored, removed = bm.drain_events()
    assert not reset and stored == [] and sorted(removed) == [11, 12]
    bm.free(other)
    for h in range(100, 110):  # more events than the log keeps between drains
        b = bm.take_block_for(h)
        assert b is not None
        bm.publish_block(b, h)
        bm.free([b])
    reset, stored, removed = bm.drain_events()
    assert reset and sorted(stored) == sorted(bm.hash_to_block) and removed == []
    bm.check_invariants()


def test_take_block_for_refuses_a_cached_hash_and_a_full_cache():
    bm = BlockManager(num_blocks=2, block_size=2)
    b = bm.take_block_for(7)
    assert b is not None
    bm.publish_block(b, 7)
    assert bm.take_block_for(7) is None  # held already
    table: list[int] = []
    assert bm.allocate(table, 2)  # the other block
    assert bm.take_block_for(8) is None  # block b is referenced by nobody but not free yet: nothing to take
    bm.free([b])
    assert bm.match_prefix([7], 1) == [b]  # freed, it stays cached for the next request
    bm.check_invariants()
