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
   overtaking by smaller requests, so order is honoured).

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


@dataclass
class SchedulerOutput:
    """Everything the runner and engine need about one step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # request ids sent back to waiting
    finished: list[str] = field(default_factory=list)  # request ids aborted since the last step
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
    ) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.starvation_s = starvation_s
        self.clock = clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._aborted: list[str] = []
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0

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

    def _running_key(self, now: float) -> Callable[[Sequence], tuple[float, int, float]]:
        return lambda s: (s.slack(now), -s.priority, s.request.arrival_time)

    def _waiting_key(self, now: float) -> Callable[[Sequence], tuple[bool, float, int, float]]:
        def key(s: Sequence) -> tuple[bool, float, int, float]:
            starving = now - s.request.arrival_time >= self.starvation_s
            return (not starving, s.slack(now), -s.priority, s.request.arrival_time)

        return key

    def _pick_victim(self, scheduled: set[int], now: float) -> Sequence | None:
        """Lowest priority, then most slack, then latest arrival, among running not yet scheduled."""
        cands = [s for s in self.running if id(s) not in scheduled]
        if not cands:
            return None
        return min(cands, key=lambda s: (s.priority, -s.slack(now), -s.request.arrival_time))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self.num_preemptions += 1

    # -- the step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts; allocate their blocks."""
        now = self.clock()
        out = SchedulerOutput(finished=self._aborted)
        self._aborted = []
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        rkey = self._running_key(now)
        decodes = sorted((s for s in self.running if s.num_remaining == 1), key=rkey)
        chunks = sorted((s for s in self.running if s.num_remaining > 1), key=rkey)
        for seq in decodes + chunks:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted as a victim earlier in this loop
            n = min(seq.num_remaining, budget)
            while not self.bm.allocate(seq.block_table, seq.num_computed_tokens + n):
                victim = self._pick_victim(scheduled, now)
                assert victim is not None  # seq itself is a candidate
                self._preempt(victim)
                out.preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self._schedule(out, seq, n, scheduled)
                budget -= n

        if not out.preempted and budget > 0:
            self.waiting.sort(key=self._waiting_key(now))
            admitted = 0
            for seq in self.waiting:
                if budget == 0 or len(self.running) >= self.max_num_seqs:
                    break
                hits = self._prefix_hits(seq)
                n_cached = len(hits) * self.bm.block_size
                n = min(seq.num_tokens - n_cached, budget)
                if not self.bm.allocate(seq.block_table, n_cached + n, hits):
                    break
                seq.num_computed_tokens = n_cached
                seq.num_cached_blocks = len(hits)
                self.prefix_hit_tokens += n_cached
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = n_cached
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                self._schedule(out, seq, n, scheduled)
                budget -= n
                admitted += 1
            del self.waiting[:admitted]
        return out

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        bs = self.bm.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, seq.num_tokens, bs, seq.extra_key)
        # NOTE: never hit the last token: it must be recomputed to get logits.
        return self.bm.match_prefix(seq.block_hashes, (seq.num_tokens - 1) // bs)

    def _schedule(self, out: SchedulerOutput, seq: Sequence, n: int, scheduled: set[int]) -> None:
        start = seq.num_computed_tokens
        out.scheduled.append(ScheduledSeq(seq, n, start, sample=start + n == seq.num_tokens))
        out.num_batched_tokens += n
        scheduled.add(id(seq))

    def commit(self, out: SchedulerOutput) -> None:
        """The runner computed the step: advance sequences and cache their newly full blocks."""
        bs = self.bm.block_size
        for item in out.scheduled:
            seq = item.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted meanwhile
            seq.num_computed_tokens = item.start + item.num_new_tokens
            if self.bm.enable_prefix_caching:
                extend_block_hashes(seq.block_hashes, seq.token_ids, seq.num_computed_tokens, bs, seq.extra_key)
                seq.num_cached_blocks = self.bm.cache_blocks(
                    seq.block_table, seq.block_hashes, seq.num_computed_tokens, seq.num_cached_blocks
                )

    def stats(self) -> dict[str, int]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "kv_blocks_total": self.bm.num_blocks,
            "kv_blocks_used": self.bm.num_used_blocks,
            "num_preemptions": self.num_preemptions,
            "prefix_hit_tokens": self.prefix_hit_tokens,
        }

