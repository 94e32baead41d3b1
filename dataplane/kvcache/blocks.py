"""Paged KV block accounting and prefix caching. Torch-free.

KV lives in fixed-size blocks of `block_size` token slots. A sequence owns a
*block table* (a list of block ids); token `i` of the sequence lives in slot
`block_table[i // block_size] * block_size + i % block_size`.

Prefix caching (vLLM's design, nano-vllm's shape): every FULL block whose KV
has been computed gets a hash chained over its parent,

    h_i = H(h_{i-1}, token ids of block i, extra key)     (extra key = variant name, codec, ...)

and `hash_to_block` maps it to the block. Blocks are reference counted. A block
whose count drops to zero goes to the tail of an LRU free queue but keeps its
hash: a later request with the same prefix takes it back (a hit) until the
allocator needs a fresh block and evicts from the head of the queue.

NOTE: the hash is blake2b, not Python's `hash()`: it is stable across
processes, so a memory pool on another pod can use the same keys.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def hash_block(parent: int | None, token_ids: Sequence[int], extra_key: str = "") -> int:
    """Stable 128-bit hash of one full block, chained on its parent's hash."""
    h = hashlib.blake2b(digest_size=16)
    h.update((parent or 0).to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    h.update(extra_key.encode())
    return int.from_bytes(h.digest(), "little")


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], num_tokens: int,
                        block_size: int, extra_key: str) -> None:
    """Append to `hashes` the chain hashes of every full block within `token_ids[:num_tokens]`.

    `hashes` already holds the first len(hashes) blocks' hashes (computed once,
    reused across steps and preemptions: they depend only on token content).
    """
    n_full = min(num_tokens, len(token_ids)) // block_size
    for i in range(len(hashes), n_full):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra_key))


class BlockManager:
    """Allocates KV blocks with reference counts, an LRU free queue and a prefix cache.

    All methods are O(blocks touched). The manager never sees tensors; the KV
    storage (`paged.py`) is indexed by the block ids it hands out.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # LRU of refcount-0 blocks: head = evicted first. Never-used blocks come first.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_evictions = 0
        self._events: list[tuple[bool, int]] | None = None  # (stored?, hash) since the last drain
        self._events_limit = 0
        self._events_lost = False

    # -- queries -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with refcount 0 (some still hold cached prefixes)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Longest run of cached blocks for these chain hashes (no side effects)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for h in block_hashes[:max_blocks]:
            b = self.hash_to_block.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    # -- allocation ----------------------------------------------------------

    def can_allocate(self, block_table: Sequence[int], num_tokens: int, hits: Sequence[int] = ()) -> bool:
        """Would `allocate(block_table, num_tokens, hits)` succeed?"""
        need = self.blocks_needed(num_tokens) - len(block_table) - len(hits)
        # a hit with refcount 0 sits in the free queue: taking it costs one free block
        taken = sum(1 for b in hits if self.ref_counts[b] == 0)
        return max(need, 0) + taken <= len(self.free_queue)

    def allocate(self, block_table: list[int], num_tokens: int, hits: Sequence[int] = ()) -> bool:
        """Grow `block_table` (in place) to cover `num_tokens` slots.

        `hits` (only for an empty table) are cached prefix blocks to share
        first. Returns False and changes nothing when blocks are short.
        """
        if not hits and len(block_table) * self.block_size >= num_tokens:
            return True  # fast path (most decode steps): the last block still has room
        assert not hits or not block_table, "prefix hits only for an empty block table"
        if not self.can_allocate(block_table, num_tokens, hits):
            return False
        self.pin(hits)
        block_table += hits
        while len(block_table) * self.block_size < num_tokens:
            block_table.append(self._take_free_block())
        return True

    def pin(self, blocks: Sequence[int]) -> None:
        """One more reference to each cached block (kept from eviction until `free(blocks)`)."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1

    def _take_free_block(self) -> int:
        b, _ = self.free_queue.popitem(last=False)  # LRU head
        h = self.block_hash[b]
        if h is not None:  # evict its cached prefix
            if self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
                self._event(False, h)
            self.block_hash[b] = None
            self.num_evictions += 1
        assert self.ref_counts[b] == 0
        self.ref_counts[b] = 1
        return b

    def cache_blocks(self, block_table: Sequence[int], block_hashes: Sequence[int],
                     num_computed: int, start: int = 0) -> int:
        """Register the hashes of full blocks whose KV is now computed.

        `block_hashes[i]` is the chain hash of block i; blocks `start ..` that
        lie entirely within the first `num_computed` tokens are registered.
        Returns the new watermark (pass it as `start` next time). A hash
        already mapped to another block (two sequences computed the same
        prefix at once) keeps the older mapping; this block is then not cached.
        """
        n = min(num_computed // self.block_size, len(block_hashes), len(block_table))
        if not self.enable_prefix_caching:
            return n
        for i in range(start, n):
            b = block_table[i]
            if self.block_hash[b] is not None:
                continue  # a prefix hit: already cached
            h = block_hashes[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = b
                self.block_hash[b] = h
                self._event(True, h)
        return max(n, start)

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block and clear the table.

        Blocks are released tail first, so under pressure a sequence's last
        blocks are evicted before its (more shareable) first ones.
        """
        for b in reversed(block_table):
            rc = self.ref_counts[b] - 1
            assert rc >= 0, f"block {b} freed more often than allocated"
            self.ref_counts[b] = rc
            if rc == 0:
                if self.block_hash[b] is None:
                    # uncached: nobody will look for it, so reuse it first
                    self.free_queue[b] = None
                    self.free_queue.move_to_end(b, last=False)
                else:
                    self.free_queue[b] = None  # tail = most recently used
        block_table.clear()

    def fork(self, block_table: Sequence[int], num_tokens: int) -> tuple[list[int], tuple[int, int] | None] | None:
        """A child table sharing the blocks that hold `num_tokens` computed tokens.

        Full blocks are shared (one more reference each); a partly filled last block is
        copied on write at once (the child will write its next token into it): a fresh block
        is taken and `(src, dst)` returned for the caller to copy the KV. None when no block is free.
        """
        full, partial = divmod(num_tokens, self.block_size)
        if partial and not self.free_queue:
            return None
        child = list(block_table[:full])
        for b in child:
            self.ref_counts[b] += 1
        if not partial:
            return child, None
        dst = self._take_free_block()
        child.append(dst)
        return child, (block_table[full], dst)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix of a free block (e.g. after weights change)."""
        for b in self.free_queue:
            h = self.block_hash[b]
            if h is not None:
                self.hash_to_block.pop(h, None)
                self.block_hash[b] = None
                self._event(False, h)

    # -- blocks from elsewhere (the memory pool) and events (prefix-aware routing) -------------

    def take_block_for(self, block_hash: int) -> int | None:
        """A free block (refcount 1) to fill with `block_hash`'s KV fetched from elsewhere; None when
        that hash is cached already, prefix caching is off or nothing is free. Once the KV is written,
        `publish_block` registers it; `free([b])` then leaves it cached for the next request."""
        if not self.enable_prefix_caching or block_hash in self.hash_to_block or not self.free_queue:
            return None
        return self._take_free_block()

    def publish_block(self, block: int, block_hash: int) -> None:
        """Register `block` (written with `block_hash`'s KV) in the prefix cache."""
        assert self.block_hash[block] is None and block_hash not in self.hash_to_block
        self.hash_to_block[block_hash] = block
        self.block_hash[block] = block_hash
        self._event(True, block_hash)

    def record_events(self, limit: int = 1 << 16) -> None:
        """Keep prefix-cache events (hash stored / evicted) for `drain_events`, at most `limit` between
        drains; past that they are dropped and the next drain is a full snapshot instead."""
        self._events, self._events_limit, self._events_lost = [], limit, True  # first drain: a snapshot

    def drain_events(self) -> tuple[bool, list[int], list[int]]:
        """(snapshot?, stored hashes, removed hashes) since the last drain. A snapshot lists every
        cached hash in `stored`: the reader forgets what it knew first."""
        if self._events is None:
            raise RuntimeError("record_events() was not called")
        if self._events_lost:
            self._events, self._events_lost = [], False
            return True, list(self.hash_to_block), []
        events, self._events = self._events, []
        return False, [h for stored, h in events if stored], [h for stored, h in events if not stored]

    def _event(self, stored: bool, block_hash: int) -> None:
        if self._events is None or self._events_lost:
            return
        if len(self._events) >= self._events_limit:
            self._events, self._events_lost = [], True
            return
        self._events.append((stored, block_hash))

    def check_invariants(self) -> None:
        """Raise AssertionError if the accounting is inconsistent (tests, debugging)."""
        assert all(rc >= 0 for rc in self.ref_counts), "negative refcount"
        zero = {b for b, rc in enumerate(self.ref_counts) if rc == 0}
        assert zero == set(self.free_queue), "free queue != refcount-0 blocks"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h, f"hash map points at block {b} with another hash"
