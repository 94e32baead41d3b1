"""One request's trip through the engine, as the HTTP layer sees it: text pieces.

`Generation.pieces()` turns the engine's token increments into text deltas
(incremental detokenization), applies stop strings on the text, and makes sure
the engine lets go of the request whenever the server stops listening early:
a stop string matched, the client disconnected (the handler task is
cancelled), or an error. Each of those aborts the request in the engine, so
its KV blocks are freed at once. When it ends, the request's counts and
latencies are recorded in the server's metrics exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvfleet.dataplane.engine.api import AsyncEngine, GenerationRequest, TokenLogprob
from kvfleet.dataplane.server.metrics import ServerMetrics
from kvfleet.dataplane.server.textstream import StopStringMatcher

log = logging.getLogger(__name__)


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


class Generation:
    """Run `request` on `engine`; iterate `pieces()` once. Counts are valid after iteration."""

    def __init__(
        self,
        engine: AsyncEngine,
        request: GenerationRequest,
        detokenizer: Detokenizer,
        stop: Sequence[str],
        metrics: ServerMetrics,
        model: str,
    ) -> None:
        self.engine = engine
        self.request = request
        self.metrics = metrics
        self.model = model
        self._detok = detokenizer
        self._stops = StopStringMatcher(stop)
        self.start_time = request.arrival_time
        self.first_token_time: float | None = None
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_cached_tokens = 0
        self.num_output_tokens = 0
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """All text shown to the client so far."""
        return self._stops.released_text

    async def pieces(self) -> AsyncIterator[Piece]:
        """Yield text pieces; the last one carries `finish_reason`. Always frees the engine request."""
        engine_done = False
        stream = self.engine.generate(self.request)
        try:
            async for out in stream:
                self.num_cached_tokens = out.num_cached_prompt_tokens
                if out.num_prompt_tokens:
                    self.num_prompt_tokens = out.num_prompt_tokens
                if out.new_token_ids and self.first_token_time is None:
                    self.first_token_time = time.monotonic()
                self.num_output_tokens += len(out.new_token_ids)
                text = "".join(self._detok.push(t) for t in out.new_token_ids)
                if out.finished:
                    text += self._detok.flush()
                shown, stopped = self._stops.push(text)
                piece = Piece(shown, list(out.new_token_ids), list(out.logprobs or ()))
                if stopped:
                    self.finish_reason = piece.finish_reason = "stop"
                    yield piece
                    return
                if out.finished:
                    engine_done = True
                    piece.text += self._stops.flush()
                    self.finish_reason = piece.finish_reason = out.finish_reason or "stop"
                    yield piece
                    return
                if piece.text or piece.logprobs:
                    yield piece
        finally:
            if not engine_done:
                await self._release_engine_request(stream)
            self._record()

    async def _release_engine_request(self, stream: AsyncIterator[object]) -> None:
        """Stop the engine working for a client that no longer listens."""
        if self.finish_reason is None:
            self.finish_reason = "abort"
        try:
            await self.engine.abort(self.request.request_id)
        except Exception:  # noqa: BLE001 - the request may already be gone; freeing is best effort
            log.debug("abort of %s failed", self.request.request_id, exc_info=True)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001
                log.debug("closing the engine stream of %s failed", self.request.request_id, exc_info=True)

    def _record(self) -> None:
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
