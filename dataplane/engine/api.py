"""The engine's public interface: what a router/server talks to.

Torch-free: the HTTP server, the router role and the operator's tests can
import these types without the model. `AsyncEngine` is the seam between the
OpenAI server and the engine; `FakeEngine` (in `fake.py`) implements it for
tests of the server alone.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]
# A request's seed is a signed 64-bit integer (what torch.Generator.manual_seed and OpenAI's API take).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token; None = off
    # penalties and biases (OpenAI's semantics; repetition_penalty as in HF/vLLM); applied in the
    # batched sampler (`logits_process.py`) before temperature and top-k/top-p
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence among generated tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens of prompt or output (logit / p if > 0 else * p)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to the logit)
    min_tokens: int = 0  # eos and stop_token_ids are banned until this many tokens are generated
    # n > 1: n sequences from one prompt (one prefill; the KV blocks of the prompt are shared). Choice i
    # samples with seed + i when a seed is given; its outputs carry `index` i (see RequestOutput).
    n: int = 1
    # structured output: the text must parse as JSON valid against this schema (JSON text), enforced by a
    # grammar's token mask at each step (engine/structured.py)
    json_schema: str | None = None

    @property
    def has_logits_processing(self) -> bool:
        """Whether any penalty, bias or min_tokens applies (the plain path skips all of it)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


class InvalidRequest(ValueError):
    """A request the engine refuses, naming the request parameter at fault (an HTTP 400 for `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class GenerationRequest:
    """One request as the engine sees it: token ids in, token ids out."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # ModelVariant name: part of the prefix-cache key, and it picks the LoRA adapter the request runs with when
    # it names one of the engine's `EngineConfig.adapters` (else the engine's own weights). A hand-off carries it.
    variant: str = ""
    slo_class: str | None = None  # SLOClass name; drives priority / deadlines
    arrival_time: float = field(default_factory=time.monotonic)
    export_kv: bool = False  # prefill role: hand the prompt's KV out with the final output (`RequestOutput.kv`)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) alternatives, best first


@dataclass(frozen=True)
class RequestOutput:
    """An increment of one request's generation (streamed as it happens).

    A stop token (the model's eos unless `ignore_eos`, or one of the request's
    `stop_token_ids`) that ends the request is the last of `new_token_ids`.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    index: int = 0  # which of the request's `sampling.n` choices this increment belongs to
    kv: KVHandoff | None = None  # the prompt's KV, on the final output of an `export_kv` request
    num_preemptions: int = 0  # times the request was preempted (recomputed) so far; set on final outputs
    queue_s: float | None = None  # time from arrival to the scheduler's first admission; set on final outputs


def choice_request_id(request_id: str, index: int) -> str:
    """The id of choice `index` of a request with n > 1 (`AsyncEngine.abort` of it ends that choice
    alone; aborting `request_id` ends them all)."""
    return f"{request_id}#{index}"


@dataclass(frozen=True)
class KVBlock:
    """One block of a prompt's KV as stored (see `kvcache/transfer.py`), with its prefix hash."""

    index: int
    block_hash: int | None  # chain hash of a full block; None for a partial last block
    payload: bytes
    crc32: int


@dataclass(frozen=True)
class KVHandoff:
    """A prefilled prompt's KV and the state decode needs to continue exactly where prefill stopped."""

    layout: str  # `kvcache.transfer.layout` of the sender; the receiver must match it
    num_tokens: int  # prompt tokens whose KV the blocks hold
    blocks: list[KVBlock]
    lane: bytes = b""  # full-precision sink/ring rows (quantized policies with lanes)
    lane_crc32: int = 0
    num_hit_blocks: int = 0  # leading blocks the sender took from its prefix cache (read as stored)
    num_cached_prompt_tokens: int = 0
    rng_state: bytes = b""  # the seeded generator after the first token (empty: unseeded or greedy)

    @property
    def nbytes(self) -> int:
        return sum(len(b.payload) for b in self.blocks) + len(self.lane)


class EngineOverloaded(Exception):
    """The engine (or fleet) cannot take this request now; retry after `retry_after_s` (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and routing decisions."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_hit_tokens: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    prompt_tokens_computed: int = 0  # prompt positions the model ran (prefix-cache hits and n > 1 forks excluded)
    shared_prefix_tokens: int = 0  # prompt positions reused from a sibling variant's KV (DroidSpeak)


class AsyncEngine(ABC):
    """An engine that many asyncio tasks can share.

    `generate` yields increments until one with `finished=True` (with `sampling.n` > 1: until
    every choice's `index` has had one, in any order). Cancelling the
    consuming task (a client disconnect) or calling `abort` ends the request
    and frees its KV blocks.
    """

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine accepts, in tokens."""

    async def admit(self, request: GenerationRequest) -> None:  # noqa: B027 - optional hook
        """Called before any response byte is sent; raise `EngineOverloaded` to answer 429."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (the step loop). Idempotent."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; pending requests finish with reason 'abort'."""
