"""Continuous-batching scheduler with chunked prefill and SLO-aware order. Imports no torch.

One call to `schedule()` decides one engine step and returns one
`SchedulerOutput`:

1. Running sequences first, decodes before unfinished prefill chunks, each
   group ordered by least slack (time until its next token is due: the TPOT
   deadline once it has produced a token), class priority as the tie-break.
   Each gets its remaining tokens (1 for a decode) within the step's token
   budget (`max_num_batched_tokens`).
2. When KV blocks run out for a running sequence, a victim is preempted by
   recompute: the lowest-priority, most-slack running sequence not yet
   scheduled this step (possibly the sequence itself). Its blocks are freed
   (they stay in the prefix cache, so re-admission is mostly hits) and it
   goes back to waiting.
3. If nothing was preempted, waiting sequences are admitted in order of
   least slack (the TTFT deadline) with priority as tie-break; one that has
   waited longer than `starvation_s` goes ahead of all that have not (aging:
   best-effort work without a deadline is never starved forever). Admission
   reuses prefix-cache hits, then takes a prefill chunk of what is left of
   the budget; it stops at the first sequence that does not fit (no
   overtaking by smaller requests, so order is honoured) — unless running
   sequences of strictly lower class priority can be preempted to make room
   (seats or blocks): priority preemption, as Kubernetes does for pods.

`commit()` advances the sequences after the runner has computed the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvfleet.dataplane.engine.sequence import SeqStatus, Sequence
from kvfleet.dataplane.kvcache.blocks import BlockManager, extend_block_hashes


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence in this step: compute `num_new_tokens` tokens starting at `start`."""

    seq: Sequence
    num_new_tokens: int
    start: int  # = seq.num_computed_tokens at schedule time (first new position)
    sample: bool  # the step completes the sequence's known tokens: sample the next one


@dataclass(slots=True)
class ScheduledReuse:
    """Before the step: copy a sibling's cached blocks `src_blocks` into `seq.block_table[first_block:]`
    and recompute the sequence's own layers there (DroidSpeak; `engine/kv_sharing.py`). The source
    blocks stay pinned until `commit`."""

    seq: Sequence
    src_blocks: list[int]
    first_block: int


@dataclass
class SchedulerOutput:
    """Everything the runner and engine need about one step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # request ids sent back to waiting
    finished: list[str] = field(default_factory=list)  # request ids aborted since the last step
    reuse: list[ScheduledReuse] = field(default_factory=list)  # cross-variant KV to fill in first
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides which sequences run each step and owns their KV blocks."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        starvation_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        hit_align_blocks: int = 1,
        max_adapters: int | None = None,
        usable_hit: Callable[[list[int]], int] | None = None,
        usable_shared: Callable[[list[int]], int] | None = None,
    ) -> None:
        """hit_align_blocks: prefix hits are taken in multiples of this many blocks (a quantized
        cache whose scale groups span blocks must never share half a group)."""
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.starvation_s = starvation_s
        self.max_adapters = max_adapters  # distinct LoRA adapters among running sequences at most
        self.clock = clock
        self.hit_align_blocks = hit_align_blocks
        self.usable_hit = usable_hit  # the KV storage's say (full-precision sinks need their stash)
        self.usable_shared = usable_shared  # leading blocks holding hidden states (None: no sharing)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._aborted: list[str] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.shared_hit_tokens = 0  # prompt tokens reused from a sibling variant's KV (DroidSpeak)
        self._step = 0  # schedule() calls so far; marks which sequences this step took

    # -- intake --------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        """Remove a sequence wherever it is and free its blocks; returns it (or None)."""
        for queue in (self.waiting, self.running):
            for i, seq in enumerate(queue):
                if seq.seq_id == seq_id:
                    del queue[i]
                    self._release(seq, "abort")
                    self._aborted.append(seq_id)
                    return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """A running sequence is done (stop token, length): free its blocks."""
        self.running.remove(seq)
        self._release(seq, reason)

    def _release(self, seq: Sequence, reason: str) -> None:
        self.bm.free(seq.block_table)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason  # type: ignore[assignment]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- ordering ------------------------------------------------------------

    @staticmethod
    def _running_key(s: Sequence) -> tuple[float, int, float]:
        # least slack first == earliest deadline first (slack = deadline - now)
        return (s.deadline(), -s.priority, s.request.arrival_time)

    def _waiting_key(self, now: float) -> Callable[[Sequence], tuple[bool, float, int, float]]:
        def key(s: Sequence) -> tuple[bool, float, int, float]:
            starving = now - s.request.arrival_time >= self.starvation_s
            return (not starving, s.slack(now), -s.priority, s.request.arrival_time)

        return key

    def _pick_victim(self, now: float) -> Sequence | None:
        """Lowest priority, then most slack, then latest arrival, among running not yet scheduled."""
        cands = [s for s in self.running if s.scheduled_step != self._step]
        if not cands:
            return None
        return min(cands, key=lambda s: (s.priority, -s.slack(now), -s.request.arrival_time))

    def _preempt(self, seq: Sequence, dest: list[Sequence] | None = None) -> None:
        """Free the sequence's blocks and send it back to waiting (or to `dest`) for recompute."""
        self.running.remove(seq)
        self.bm.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        # NOTE: recompute restarts from the full token list; the evicted state is discarded
        seq.num_evicted = 0
        seq.kept_positions = None
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        (self.waiting if dest is None else dest).append(seq)
        self.num_preemptions += 1

    # -- the step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts; allocate their blocks."""
        now = self.clock()
        out = SchedulerOutput(finished=self._aborted)
        self._aborted = []
        self._step += 1
        budget = self.max_num_batched_tokens
        bs = self.bm.block_size

        decodes: list[Sequence] = []
        chunks: list[Sequence] = []
        for s in self.running:
            (decodes if len(s.token_ids) - s.num_computed_tokens == 1 else chunks).append(s)
        # NOTE: order among decodes only matters when budget or blocks are short (each
        # decode needs at most one new block), so the common case skips the sort.
        if len(decodes) > budget or len(decodes) > self.bm.num_free_blocks:
            decodes.sort(key=self._running_key)
        chunks.sort(key=self._running_key)
        for seq in decodes + chunks if chunks else decodes:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted as a victim earlier in this loop
            start = seq.num_computed_tokens
            n = min(len(seq.token_ids) - start, budget)
            phys_end = start - seq.num_evicted + n  # slots needed (physical, after eviction)
            if len(seq.block_table) * bs < phys_end:  # needs new blocks
                while not self.bm.allocate(seq.block_table, phys_end):
                    victim = self._pick_victim(now)
                    assert victim is not None  # seq itself is a candidate
                    self._preempt(victim)
                    out.preempted.append(victim.seq_id)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue
            seq.scheduled_step = self._step
            out.scheduled.append(ScheduledSeq(seq, n, start, start + n == len(seq.token_ids)))
            budget -= n

        if not out.preempted and budget > 0:  # running work fits: admit waiting work
            budget = self._admit(out, budget, now)
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> int:
        """Admit waiting sequences in order while budget, seats and blocks last; returns the budget left.

        A waiting sequence short of seats (`max_num_seqs`) or blocks may preempt
        running sequences of strictly LOWER class priority (lowest first); equal
        priorities never preempt each other, so there is no thrashing.
        """
        self.waiting.sort(key=self._waiting_key(now))
        admitted: list[Sequence] = []
        victims: list[Sequence] = []  # joined to waiting after the loop: never re-admitted this step
        ok = True
        adapters = self.running_adapters()
        for seq in self.waiting:
            if budget == 0:
                break
            if not self.adapter_fits(seq, adapters):
                break  # its adapter waits for one of the running ones to finish (order is kept)
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            while ok and len(self.running) >= self.max_num_seqs:
                ok, budget = self._preempt_lower(seq, out, budget, now, victims, admitted)
            if not ok:
                break
            hits = self._prefix_hits(seq)
            borrowed = self._sibling_hits(seq, len(hits))  # pinned until commit
            n_own = len(hits) * self.bm.block_size
            n_cached = n_own + len(borrowed) * self.bm.block_size
            while ok and not self.bm.allocate(
                    seq.block_table, n_cached + min(seq.num_tokens - n_cached, budget), hits):
                ok, budget = self._preempt_lower(seq, out, budget, now, victims, admitted)
            if not ok:
                self.bm.free(borrowed)
                break
            if borrowed:
                out.reuse.append(ScheduledReuse(seq, borrowed, len(hits)))
                self.shared_hit_tokens += n_cached - n_own
            n = min(seq.num_tokens - n_cached, budget)
            seq.num_computed_tokens = n_cached
            seq.num_cached_blocks = len(hits)  # the reused blocks are registered under seq's own key by commit
            seq.num_hit_blocks = len(hits) + len(borrowed)
            self.prefix_hit_tokens += n_own
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = n_own
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            seq.scheduled_step = self._step
            out.scheduled.append(ScheduledSeq(seq, n, n_cached, n_cached + n == seq.num_tokens))
            budget -= n
            admitted.append(seq)
        del self.waiting[:len(admitted)]
        self.waiting.extend(victims)
        return budget

    def running_adapters(self) -> set[str]:
        return {s.adapter for s in self.running if s.adapter is not None}

    def adapter_fits(self, seq: Sequence, adapters: set[str] | None = None) -> bool:
        """Whether `seq` may run now without more than `max_adapters` distinct adapters among running ones."""
        if seq.adapter is None or self.max_adapters is None:
            return True
        adapters = self.running_adapters() if adapters is None else adapters
        return seq.adapter in adapters or len(adapters) < self.max_adapters

    def _preempt_lower(self, seq: Sequence, out: SchedulerOutput, budget: int, now: float,
                       victims: list[Sequence], admitted: list[Sequence]) -> tuple[bool, int]:
        """Preempt the lowest-priority running sequence below `seq`'s class priority (not one
        admitted this step), refunding its tokens if this step had scheduled it.
        Returns (found a victim, new budget)."""
        cands = [s for s in self.running if s.priority < seq.priority and not any(s is a for a in admitted)]
        if not cands:
            return False, budget
        victim = min(cands, key=lambda s: (s.priority, -s.slack(now), -s.request.arrival_time))
        if victim.scheduled_step == self._step:  # drop it from this step and refund its tokens
            for i, item in enumerate(out.scheduled):
                if item.seq is victim:
                    budget += item.num_new_tokens
                    del out.scheduled[i]
                    break
        self._preempt(victim, victims)
        out.preempted.append(victim.seq_id)
        return True, budget

    def fork(self, parent: Sequence, child: Sequence) -> tuple[bool, tuple[int, int] | None]:
        """Run `child` (another choice of `parent`'s request, same prompt) on the parent's computed KV:
        full blocks shared by reference, a partly filled last block copied on write. Returns (ok, the
        (src, dst) block whose KV the caller must copy). Not ok when seats or blocks are short, or the
        parent's KV has been compacted by eviction: the caller then queues the child for recompute."""
        if len(self.running) >= self.max_num_seqs or parent.num_evicted:
            return False, None
        got = self.bm.fork(parent.block_table, parent.num_computed_tokens)
        if got is None:
            return False, None
        child.block_table, copy = got
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = parent.block_hashes[:parent.num_computed_tokens // self.bm.block_size]
        child.num_cached_blocks = min(parent.num_cached_blocks, len(child.block_hashes))
        child.num_hit_blocks = parent.num_hit_blocks
        child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
        child.status = SeqStatus.RUNNING
        child.scheduled_step = self._step
        self.running.append(child)
        return True, copy

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        bs = self.bm.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, seq.num_tokens, bs, seq.extra_key)
        # NOTE: never hit the last token: it must be recomputed to get logits.
        hits = self.bm.match_prefix(seq.block_hashes, (seq.num_tokens - 1) // bs)
        hits = hits[:len(hits) - len(hits) % self.hit_align_blocks]
        return hits[:self.usable_hit(hits)] if self.usable_hit is not None else hits

    def _sibling_hits(self, seq: Sequence, num_own: int) -> list[int]:
        """The sibling's cached blocks beyond `seq`'s own `num_own` hits (pinned: one reference each), when
        `seq` may reuse a sibling's KV; the worker's `usable_shared` says which hold their hidden states."""
        if not seq.share_key or self.usable_shared is None:
            return []
        bs = self.bm.block_size
        extend_block_hashes(seq.share_hashes, seq.token_ids, seq.num_tokens, bs, seq.share_key)
        found = self.bm.match_prefix(seq.share_hashes, (seq.num_tokens - 1) // bs)
        found = found[:self.usable_shared(found)]
        if len(found) <= num_own:
            return []
        borrowed = found[num_own:]
        self.bm.pin(borrowed)
        return borrowed

    def commit(self, out: SchedulerOutput) -> None:
        """The runner computed the step: advance sequences and cache their newly full blocks."""
        for job in out.reuse:
            self.bm.free(job.src_blocks)  # unpinned: the sibling's blocks stay cached for the next one
        out.reuse = []
        bs = self.bm.block_size
        caching = self.bm.enable_prefix_caching
        for item in out.scheduled:
            seq = item.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted meanwhile
            computed = seq.num_computed_tokens = item.start + item.num_new_tokens
            # NOTE: an evicted sequence's slots no longer hold the chain's tokens: never publish again
            if caching and not seq.num_evicted and computed // bs > seq.num_cached_blocks:  # a block just filled up
                extend_block_hashes(seq.block_hashes, seq.token_ids, computed, bs, seq.extra_key)
                seq.num_cached_blocks = self.bm.cache_blocks(
                    seq.block_table, seq.block_hashes, computed, seq.num_cached_blocks
                )

    def stats(self) -> dict[str, int]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_blocks_total": self.bm.num_blocks,
            "kv_blocks_used": self.bm.num_used_blocks,
            "num_preemptions": self.num_preemptions,
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "shared_hit_tokens": self.shared_hit_tokens,
        }

