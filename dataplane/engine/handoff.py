"""Prefill -> decode hand-off inside one engine: export a prefilled prompt's KV, import it elsewhere.

Prefill side: a request with `export_kv` runs as usual with `max_tokens=1`; when it ends, before
its blocks are freed, `export_kv` copies the blocks holding its prompt (as stored), its lane rows
and its seeded generator's state into a `KVHandoff`.

Memory pool: `prompt_block_hashes` names the prompt's full blocks as the prefix cache does, and
`import_blocks` writes blocks fetched from the pool into free blocks and caches them, so the request
that follows takes them as ordinary prefix-cache hits (with a hit's semantics for lanes: see
`paged_quant`). Blocks go out to the pool from an export (`export_kv`), as stored.

Decode side: `Reservations` holds blocks for a request before its KV arrives (the router asks
first, so a decode pod with no room says so before anything moves); `admit_prefilled` writes the
hand-off into those blocks and puts the sequence straight into the running batch, one token past
the prompt — the next step computes the first token's KV and samples the second, as a colocated
engine would. Without a usable hand-off (none pushed, a checksum failed) the sequence is queued
to recompute its prompt and first token instead; the output is the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvfleet.dataplane.engine.api import GenerationRequest, KVBlock, KVHandoff
from kvfleet.dataplane.engine.sequence import SeqStatus, Sequence
from kvfleet.dataplane.kvcache import transfer
from kvfleet.dataplane.kvcache.blocks import extend_block_hashes


def export_kv(engine: Any, seq: Sequence) -> KVHandoff:
    """The KV of `seq`'s prompt as stored in `engine`'s cache (call before its blocks are freed)."""
    if engine.evictor is not None:
        raise ValueError("a sequence whose KV is evicted cannot be handed off (eviction state stays local)")
    kv, bs = engine.worker.kv, engine.scheduler.bm.block_size
    n = seq.num_prompt_tokens
    nblocks = -(-n // bs)
    blocks = []
    for i, b in enumerate(seq.block_table[:nblocks]):
        payload = transfer.read_block(kv, b)
        h = seq.block_hashes[i] if i < len(seq.block_hashes) and (i + 1) * bs <= n else None
        blocks.append(KVBlock(i, h, payload, transfer.checksum(payload)))
    lane = b""
    if kv.lanes is not None:
        lane = transfer.read_lane(kv, kv.lane(seq))
    return KVHandoff(engine.kv_layout, n, blocks, lane, transfer.checksum(lane), seq.num_hit_blocks,
                     seq.num_cached_prompt_tokens, engine.runner.generator_state(seq.seq_id))


@dataclass
class Reservations:
    """Blocks held for requests whose KV is on its way (decode role)."""

    tables: dict[str, list[int]] = field(default_factory=dict)
    deadlines: dict[str, float] = field(default_factory=dict)  # monotonic time after which nobody will claim it

    def reserve(self, engine: Any, rid: str, num_prompt_tokens: int, max_tokens: int, ttl_s: float = 60.0) -> bool:
        """Hold blocks for the prompt if a seat and room for it plus one block of output remain; unclaimed
        after `ttl_s` (the caller's prefill deadline), they are freed."""
        sched, bm = engine.scheduler, engine.scheduler.bm
        if rid in self.tables:
            raise ValueError(f"duplicate reservation {rid!r}")
        if num_prompt_tokens < 1 or num_prompt_tokens >= engine.max_model_len:
            raise ValueError(f"prompt of {num_prompt_tokens} tokens does not fit max_model_len {engine.max_model_len}")
        seats = len(sched.running) + len(sched.waiting) + len(self.tables)
        headroom = bm.blocks_needed(num_prompt_tokens + min(max_tokens, bm.block_size))
        if seats >= sched.max_num_seqs or headroom > bm.num_free_blocks:
            return False
        table: list[int] = []
        if not bm.allocate(table, num_prompt_tokens):
            return False
        self.tables[rid] = table
        self.deadlines[rid] = time.monotonic() + ttl_s
        return True

    def release(self, engine: Any, rid: str) -> bool:
        table = self.tables.pop(rid, None)
        self.deadlines.pop(rid, None)
        if table is None:
            return False
        engine.scheduler.bm.free(table)
        return True

    def expire(self, engine: Any, now: float | None = None) -> list[str]:
        """Free reservations past their deadline (a router that died between Reserve and Generate)."""
        now = time.monotonic() if now is None else now
        old = [rid for rid, t in self.deadlines.items() if now > t]
        for rid in old:
            self.release(engine, rid)
        return old


def usable(engine: Any, handoff: KVHandoff | None, num_prompt_tokens: int) -> str | None:
    """Why `handoff` cannot be used for this prompt (None = it can)."""
    if handoff is None:
        return "no KV was pushed"
    if handoff.layout != engine.kv_layout:
        return "the sender's KV layout differs from this engine's"
    if handoff.num_tokens != num_prompt_tokens:
        return f"KV for {handoff.num_tokens} tokens, the prompt has {num_prompt_tokens}"
    if any(transfer.checksum(b.payload) != b.crc32 for b in handoff.blocks):
        return "a block's checksum does not match"
    if transfer.checksum(handoff.lane) != handoff.lane_crc32:
        return "the lane's checksum does not match"
    return None


def admit_prefilled(engine: Any, request: GenerationRequest, first_token: int, handoff: KVHandoff | None,
                    table: list[int] | None) -> tuple[Sequence, bool]:
    """Start decoding `request` after its first token. Returns (sequence, recomputed)."""
    seq = engine.new_sequence(request)
    seq.token_ids.append(first_token)
    seq.num_emitted = 1  # the router already sent the first token
    seq.first_token_time = seq.last_token_time = time.monotonic()
    engine.generation_tokens += 1
    engine.prompt_tokens += seq.num_prompt_tokens
    bm = engine.scheduler.bm
    # NOTE: a LoRA adapter beyond the engine's max_active_adapters queues it like a recompute: the scheduler
    # admits it when an adapter slot frees (the pushed KV is dropped)
    if usable(engine, handoff, seq.num_prompt_tokens) is not None or table is None \
            or not engine.scheduler.adapter_fits(seq):
        if table is not None:
            bm.free(table)
        engine.scheduler.add(seq)  # recompute prompt + first token, then go on
        return seq, True
    assert handoff is not None
    kv = engine.worker.kv
    for blk in handoff.blocks:
        transfer.write_block(kv, table[blk.index], blk.payload)
    seq.block_table = table
    seq.num_computed_tokens = seq.num_prompt_tokens
    seq.num_hit_blocks = handoff.num_hit_blocks
    seq.num_cached_prompt_tokens = handoff.num_cached_prompt_tokens
    seq.status = SeqStatus.RUNNING
    engine.scheduler.running.append(seq)
    if handoff.lane:
        transfer.write_lane(kv, kv.lane(seq), handoff.lane)
    if handoff.rng_state:
        engine.runner.restore_generator(seq, handoff.rng_state)
    return seq, False


def prompt_block_hashes(engine: Any, request: GenerationRequest) -> list[int]:
    """Chain hashes of the prompt blocks a prefix hit may cover (never the block of the last token,
    whose logits must be computed), exactly as the scheduler hashes them."""
    ids = request.prompt_token_ids
    hashes: list[int] = []
    extend_block_hashes(hashes, ids, len(ids) - 1, engine.scheduler.bm.block_size,
                        engine.prefix_key(request.variant))
    return hashes


def num_cached_blocks(engine: Any, hashes: list[int]) -> int:
    """How many leading blocks of `hashes` this engine's prefix cache holds."""
    return len(engine.scheduler.bm.match_prefix(hashes, len(hashes)))


def import_blocks(engine: Any, blocks: list[tuple[int, bytes]]) -> int:
    """Cache fetched `(hash, payload)` blocks (chain order, checksums already checked) in free blocks.

    Returns how many leading blocks are now cached (held before or imported); stops at the first that
    cannot be (no free block, a payload of another size). The blocks wait in the LRU like any freed
    prefix, so a request added next takes them unless the cache is under pressure meanwhile."""
    if engine.evictor is not None:
        return 0  # evicted sequences' slots do not hold the chain's tokens: the prefix cache stays local
    bm, kv = engine.scheduler.bm, engine.worker.kv
    n = 0
    for h, payload in blocks:
        if h in bm.hash_to_block:
            n += 1
            continue
        b = bm.take_block_for(h)
        if b is None:
            break
        try:
            transfer.write_block(kv, b, payload)
        except ValueError:
            bm.free([b])
            break
        bm.publish_block(b, h)
        bm.free([b])
        n += 1
    return n
