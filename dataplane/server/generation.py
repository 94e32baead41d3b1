"""One request's trip through the engine, as the HTTP layer sees it: text pieces.

`Generation.pieces()` turns the engine's token increments into text deltas
(incremental detokenization), applies stop strings on the text, and makes sure
the engine lets go of the request whenever the server stops listening early:
a stop string matched, the client disconnected (the handler task is
cancelled), or an error. Each of those aborts the request in the engine, so
its KV blocks are freed at once. When it ends, the request's counts and
latencies are recorded in the server's metrics exactly once.

A request with `sampling.n` > 1 has n choices; each has its own detokenizer and
stop-string matcher, and its pieces carry its `index`. A stop string ends that
choice alone (its engine sequence is aborted by `choice_request_id`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvfleet.dataplane.engine.api import AsyncEngine, GenerationRequest, TokenLogprob, choice_request_id
from kvfleet.dataplane.server.metrics import ServerMetrics
from kvfleet.dataplane.server.textstream import StopStringMatcher

log = logging.getLogger(__name__)


class RequestTracer(Protocol):
    """A request's trace as `Generation` drives it (`kvfleet.dataplane.tracing.RequestTrace`)."""

    def first_token(self) -> None: ...

    def set(self, **attrs: Any) -> None: ...

    def finish(self, input_tokens: int, output_tokens: int, finish_reason: str, cached_tokens: int = 0,
               preemptions: int = 0) -> Any: ...


class Detokenizer(Protocol):
    """Streaming token -> text (`Tokenizer.detokenizer(prompt_ids)` returns one)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class Piece:
    """Text for the client, the tokens behind it, and, on the last piece, why generation ended."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    index: int = 0  # the choice (0 .. n-1)


@dataclass
class _Choice:
    detok: Detokenizer
    stops: StopStringMatcher
    num_output_tokens: int = 0
    finish_reason: str | None = None


class Generation:
    """Run `request` on `engine`; iterate `pieces()` once. Counts are valid after iteration."""

    def __init__(
        self,
        engine: AsyncEngine,
        request: GenerationRequest,
        detokenizer: Detokenizer | Sequence[Detokenizer],  # one per choice when sampling.n > 1
        stop: Sequence[str],
        metrics: ServerMetrics,
        model: str,
        trace: Callable[[Generation], RequestTracer] | None = None,
    ) -> None:
        """trace: makes the request's span when `pieces()` starts (`tracing.RequestTrace`), or None."""
        self.engine = engine
        self._make_trace = trace
        self._trace: RequestTracer | None = None
        self.request = request
        self.metrics = metrics
        self.model = model
        detoks = list(detokenizer) if isinstance(detokenizer, Sequence) else [detokenizer]
        if len(detoks) != request.sampling.n:
            raise ValueError(f"need one detokenizer per choice ({request.sampling.n}), got {len(detoks)}")
        self._choices = [_Choice(d, StopStringMatcher(stop)) for d in detoks]
        self.start_time = request.arrival_time
        self.first_token_time: float | None = None
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_cached_tokens = 0
        self.num_preemptions = 0  # the engine's count for this request (final outputs carry it)
        self.queue_s: float | None = None  # the engine's queue time (final outputs carry it)

    @property
    def text(self) -> str:
        """All text of choice 0 shown to the client so far."""
        return self._choices[0].stops.released_text

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens of all choices together (what `usage.completion_tokens` counts)."""
        return sum(c.num_output_tokens for c in self._choices)

    @property
    def finish_reason(self) -> str | None:
        """Choice 0's finish reason (None while it runs)."""
        return self._choices[0].finish_reason

    def finish_reasons(self) -> list[str | None]:
        return [c.finish_reason for c in self._choices]

    async def pieces(self) -> AsyncIterator[Piece]:
        """Yield text pieces; each choice's last one carries `finish_reason`. Always frees the engine request."""
        engine_done = False
        if self._make_trace is not None:  # in this task, so the engine's hops are its children
            self._trace = self._make_trace(self)
        stream = self.engine.generate(self.request)
        choices = self._choices
        open_choices = len(choices)
        any_stopped = False  # a stop string ended a choice: the engine may still hold (or report) it
        try:
            async for out in stream:
                self.num_cached_tokens = out.num_cached_prompt_tokens
                self.num_preemptions = max(self.num_preemptions, out.num_preemptions)
                if out.queue_s is not None:
                    self.queue_s = out.queue_s
                if out.num_prompt_tokens:
                    self.num_prompt_tokens = out.num_prompt_tokens
                c = choices[out.index]
                if c.finish_reason is not None:
                    continue  # a choice ended by a stop string: its engine sequence's final output
                if out.new_token_ids and self.first_token_time is None:
                    self.first_token_time = time.monotonic()
                    if self._trace is not None:
                        self._trace.first_token()
                c.num_output_tokens += len(out.new_token_ids)
                text = "".join(c.detok.push(t) for t in out.new_token_ids)
                if out.finished:
                    text += c.detok.flush()
                shown, stopped = c.stops.push(text)
                piece = Piece(shown, list(out.new_token_ids), list(out.logprobs or ()), index=out.index)
                if stopped or out.finished:
                    if not stopped:
                        piece.text += c.stops.flush()
                    c.finish_reason = piece.finish_reason = "stop" if stopped else (out.finish_reason or "stop")
                    open_choices -= 1
                    any_stopped = any_stopped or stopped
                    engine_done = open_choices == 0 and not any_stopped
                    yield piece
                    if open_choices == 0:
                        return
                    if stopped and len(choices) > 1:
                        await self._abort_quietly(choice_request_id(self.request.request_id, out.index))
                    continue
                if piece.text or piece.logprobs:
                    yield piece
        finally:
            if not engine_done:
                await self._release_engine_request(stream)
            self._record()

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - best effort
            log.debug("abort of %s failed", request_id, exc_info=True)

    async def _release_engine_request(self, stream: AsyncIterator[object]) -> None:
        """Stop the engine working for a client that no longer listens."""
        for c in self._choices:
            if c.finish_reason is None:
                c.finish_reason = "abort"
        await self._abort_quietly(self.request.request_id)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001
                log.debug("closing the engine stream of %s failed", self.request.request_id, exc_info=True)

    def _record(self) -> None:
        if self._trace is not None:
            if self.queue_s is not None:
                self._trace.set(**{"kvfleet.engine_queue_ms": self.queue_s * 1000})
            self._trace.finish(self.num_prompt_tokens, self.num_output_tokens, self.finish_reason or "abort",
                               self.num_cached_tokens, self.num_preemptions)
        now = time.monotonic()
        ttft = None if self.first_token_time is None else self.first_token_time - self.start_time
        self.metrics.observe_request(
            self.model,
            self.request.slo_class,
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_output_tokens,
            finish_reason=self.finish_reason or "abort",
            ttft_s=ttft,
            e2e_s=now - self.start_time,
        )
