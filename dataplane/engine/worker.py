"""The worker: model runner + KV storage (+ token eviction), driven by typed step messages.

    plan = scheduler.schedule()        # StepPlan: which sequences compute which tokens (no torch)
    result = worker.execute(plan)      # StepResult: the sampled tokens
    engine.postprocess(plan, result)   # advance sequences, emit outputs; worker.evict(...) after

The scheduler owns the block tables (`kvcache.blocks.BlockManager`); the worker owns what the blocks
hold. A prefill worker and a decode worker are this same worker: they differ only in how a sequence
is admitted (`LLMEngine.add_request`, or `LLMEngine.add_prefilled`, whose KV `handoff.admit_prefilled`
writes into the worker's storage).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from kvfleet.dataplane.engine.api import TokenLogprob
from kvfleet.dataplane.engine.model_runner import ModelRunner
from kvfleet.dataplane.engine.scheduler import SchedulerOutput
from kvfleet.dataplane.engine.sequence import Sequence
from kvfleet.dataplane.kvcache.blocks import BlockManager
from kvfleet.dataplane.kvcache.eviction import EvictionSpec
from kvfleet.dataplane.kvcache.paged_eviction import PagedEvictor, PromptScorer
from kvfleet.dataplane.kvcache.storage import KVStorage

StepPlan = SchedulerOutput  # the scheduler's message to the worker: one step's sequences and new tokens
Sample = tuple[int, TokenLogprob | None]  # (token id, its logprob when asked for)


@dataclass
class StepResult:
    """The worker's answer to one `StepPlan`."""

    samples: list[Sample | None]  # aligned with plan.scheduled: a token, or None (a prefill chunk)
    fork_samples: dict[str, Sample] = field(default_factory=dict)  # n > 1: first token of each forked choice


class Worker:
    """Runs steps over one KV storage: the model runner, and the evictor when the policy evicts tokens."""

    def __init__(self, model: Any, kv: KVStorage, bm: BlockManager, eviction: EvictionSpec,
                 device: torch.device, scorer: PromptScorer | None = None) -> None:
        """scorer: eviction lookahead's trained module (`LookaheadKV.prompt_scorer`)."""
        self.kv = kv
        # token eviction: kept-token sets compacted after each step (h2o/snapkv scores are the
        # storage's score hook; lookahead's module scores a prompt once it is computed)
        self.evictor = PagedEvictor(eviction, kv, bm, scorer=scorer) if eviction.enabled else None
        self.runner = ModelRunner(model, kv, device)

    def execute(self, plan: StepPlan) -> StepResult:
        """Compute one step: the forward over every scheduled sequence, then sampling."""
        samples = self.runner.run(plan)
        return StepResult(samples, self.runner.fork_samples)

    def evict(self, seqs: Iterable[Sequence]) -> None:
        """After a step: compact the KV of each sequence over its eviction budget."""
        if self.evictor is not None:
            for seq in seqs:
                self.evictor.maybe_compact(seq)

    @property
    def can_share_blocks(self) -> bool:
        """Whether the choices of an n > 1 request may share the prompt's blocks (else they recompute)."""
        return self.kv.exact and self.evictor is None

    def copy_block(self, src: int, dst: int) -> None:
        self.kv.copy_block(src, dst)

    def release(self, seq_id: str) -> None:
        """A sequence is finished: drop its per-sequence state (RNG, grammar, lane, eviction scores)."""
        self.runner.release(seq_id)
        if self.evictor is not None:
            self.evictor.release(seq_id)
