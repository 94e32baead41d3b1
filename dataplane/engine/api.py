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


@dataclass
class GenerationRequest:
    """One request as the engine sees it: token ids in, token ids out."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    variant: str = ""  # ModelVariant name; part of the prefix-cache key
    slo_class: str | None = None  # SLOClass name; drives priority / deadlines
    arrival_time: float = field(default_factory=time.monotonic)


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


class AsyncEngine(ABC):
    """An engine that many asyncio tasks can share.

    `generate` yields increments until one with `finished=True`. Cancelling the
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

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (the step loop). Idempotent."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; pending requests finish with reason 'abort'."""
