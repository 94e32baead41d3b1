"""Per-request state the scheduler and engine share. Torch-free.

One `Sequence` per request. Prefill and decode are the same thing here (as in
vLLM v1): a sequence has `token_ids` (prompt + generated) of which the first
`num_computed_tokens` have KV in the cache; each step computes some of the rest.
When everything is computed the step samples one more token. A decode step is
simply "1 token left to compute"; a preempted sequence recomputes all of its
tokens (prompt and generated), usually mostly from the prefix cache.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from kvfleet.dataplane.engine.api import FinishReason, GenerationRequest, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's tokens, KV blocks and SLO bookkeeping."""

    request: GenerationRequest
    priority: int = 0
    ttft_s: float = math.inf  # target time to first token (inf = best effort)
    tpot_s: float = math.inf  # target time per output token
    extra_key: str = ""  # prefix-cache isolation key (keys.prefix_extra_key: variant, weights, codec)
    adapter: str | None = None  # the LoRA adapter (its variant name) this sequence runs with; None = base
    # DroidSpeak: the sibling variant's prefix key whose cached KV this sequence may reuse ("" = none)
    share_key: str = ""
    share_hashes: list[int] = field(default_factory=list)  # the prompt's chain hashes under share_key
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full blocks (content only)
    num_cached_blocks: int = 0  # blocks already registered in the prefix cache
    status: SeqStatus = SeqStatus.WAITING
    num_cached_prompt_tokens: int = 0  # prefix-cache hit at first admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when the scheduler first admitted it (queue time = this - arrival)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: FinishReason | None = None
    scheduled_step: int = -1  # last scheduler step that scheduled this sequence
    num_emitted: int = 0  # output tokens already handed to the caller
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # token eviction (kvcache/paged_eviction.py): LOGICAL position (RoPE) of token i is i; its
    # PHYSICAL slot index is i - num_evicted for tokens computed after the last compaction.
    num_evicted: int = 0  # tokens dropped from the KV so far (0 = KV is the plain prefix)
    kept_positions: list[int] | None = None  # logical positions of the slots kept by the last compaction
    num_hit_blocks: int = 0  # leading blocks taken from the prefix cache at admission (never compacted)
    # n > 1: choice `index` of request `group_id` (its own request_id is choice_request_id(group_id, index));
    # the leader (index 0) holds the other choices in `forks` until its prompt is computed
    group_id: str | None = None
    index: int = 0
    forks: list[Sequence] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def seq_id(self) -> str:
        return self.request.request_id

    @property
    def output_id(self) -> str:
        """The request id its outputs carry (the group's for a choice of n > 1)."""
        return self.group_id or self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_remaining(self) -> int:
        """Tokens whose KV is not computed yet (1 while decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_kv_slots(self) -> int:
        """PHYSICAL KV length: slots holding computed tokens (== num_computed_tokens without eviction)."""
        return self.num_computed_tokens - self.num_evicted

    def deadline(self) -> float:
        """When the next token is due (monotonic seconds): TTFT before the first token, TPOT after."""
        if self.last_token_time is None:
            return self.request.arrival_time + self.ttft_s
        return self.last_token_time + self.tpot_s

    def slack(self, now: float) -> float:
        """Seconds until the next token is late (negative = already late; inf = no target)."""
        return self.deadline() - now
