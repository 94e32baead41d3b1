"""`FakeEngine`: an honest in-process `AsyncEngine` for tests of the server alone.

No model, no torch. It keeps the contract a real engine keeps, so a server
that works against it has been tested on everything except the numbers:

- Output is deterministic and derived from the prompt: it echoes the prompt's
  tokens cyclically (starting at an offset taken from `seed` when one is given),
  so any tokenizer can decode it and a test can predict every token.
- `max_tokens`, `stop_token_ids`, eos (unless `ignore_eos`, which spares only eos, as the real engine) and `max_model_len`
  end a request with reasons "length" / "stop" / "length".
- At most `max_num_seqs` requests run at once; the rest wait (and count as
  waiting in `stats()`).
- KV blocks are accounted per running request (ceil(tokens / block_size)) and
  freed when the request finishes, is aborted, or its consumer is cancelled.
- Prefix-cache hits are counted on full blocks of prompts seen before.
- `abort(request_id)` ends the request with reason "abort"; aborting an unknown
  or finished request is a no-op.

    engine = FakeEngine(max_model_len=256, token_delay_s=0.01)
    async for out in engine.generate(GenerationRequest("r1", [5, 6, 7])):
        ...
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from kvfleet.dataplane.engine.api import (
    AsyncEngine,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    TokenLogprob,
)


@dataclass
class _FakeRequest:
    request: GenerationRequest
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    running: bool = False
    num_output_tokens: int = 0


class FakeEngine(AsyncEngine):
    """A deterministic, model-free engine; see the module docstring for its contract.

    Args:
        max_model_len: longest prompt + completion accepted.
        max_num_seqs: requests generating at once; the rest wait.
        num_kv_blocks / block_size: KV capacity reported (and used) in `stats()`.
        first_token_delay_s: simulated prefill time before the first token.
        token_delay_s: simulated time per further token.
        eos_token_ids: ids that end a request with "stop" (unless `ignore_eos`),
            on top of each request's `stop_token_ids`.
        vocab_size: logprob alternatives are drawn from ids below this.
    """

    def __init__(
        self,
        *,
        max_model_len: int = 2048,
        max_num_seqs: int = 64,
        num_kv_blocks: int = 4096,
        block_size: int = 16,
        first_token_delay_s: float = 0.0,
        token_delay_s: float = 0.0,
        eos_token_ids: Iterable[int] = (),
        vocab_size: int = 256,
    ) -> None:
        self._max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.first_token_delay_s = first_token_delay_s
        self.token_delay_s = token_delay_s
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self._requests: dict[str, _FakeRequest] = {}
        self._slots: asyncio.Semaphore | None = None  # created lazily inside the serving loop
        self._seen_prefix_blocks: set[tuple[int, ...]] = set()
        self._prefix_hit_tokens = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self.num_aborted = 0  # for tests: how many requests ended by abort or cancellation

    # -- AsyncEngine ---------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def stats(self) -> EngineStats:
        running = [r for r in self._requests.values() if r.running]
        used = sum(self._blocks_for(r) for r in running)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(self._requests) - len(running),
            kv_blocks_total=self.num_kv_blocks,
            kv_blocks_used=used,
            prefix_cache_hit_tokens=self._prefix_hit_tokens,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            num_preemptions=0,
        )

    async def abort(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is not None:
            state.aborted.set()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        prompt = request.prompt_token_ids
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        if len(prompt) >= self._max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; max_model_len is {self._max_model_len}")
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        sp = request.sampling
        if sp.n != 1 or sp.has_logits_processing or sp.json_schema is not None:
            # nothing declared is silently ignored: the fake cannot honour these
            raise ValueError("the fake engine serves n=1 without penalties, logit_bias, min_tokens or json_schema")
        state = _FakeRequest(request)
        self._requests[request.request_id] = state
        try:
            if not await self._admit(state):
                self.num_aborted += 1
                yield self._final(request, "abort", 0)
                return
            cached = self._count_prefix_hits(prompt)
            self._prompt_tokens += len(prompt)
            async for out in self._decode(state, cached):
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            self.num_aborted += 1
            raise
        finally:
            self._requests.pop(request.request_id, None)
            if state.running and self._slots is not None:
                self._slots.release()
            state.running = False

    # -- internals -------------------------------------------------------------

    async def _admit(self, state: _FakeRequest) -> bool:
        """Wait for a free slot; False if the request was aborted while waiting."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_num_seqs)
        acquire = asyncio.ensure_future(self._slots.acquire())
        aborted = asyncio.ensure_future(state.aborted.wait())
        try:
            await asyncio.wait({acquire, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
            if not acquire.done():
                acquire.cancel()
        got_slot = acquire.done() and not acquire.cancelled()
        if got_slot and state.aborted.is_set():
            self._slots.release()
            return False
        state.running = got_slot
        return got_slot

    async def _decode(self, state: _FakeRequest, cached: int) -> AsyncIterator[RequestOutput]:
        request, sampling = state.request, state.request.sampling
        prompt = request.prompt_token_ids
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        offset = (sampling.seed or 0) % len(prompt)
        budget = min(sampling.max_tokens, self._max_model_len - len(prompt))
        for step in range(budget):
            delay = self.first_token_delay_s if step == 0 else self.token_delay_s
            if await self._aborted_within(state, delay):
                self.num_aborted += 1
                yield self._final(request, "abort", cached)
                return
            token = prompt[(offset + step) % len(prompt)]
            state.num_output_tokens += 1
            self._generation_tokens += 1
            reason: FinishReason | None = None
            if token in stop_ids:
                reason = "stop"
            elif step + 1 == budget:
                reason = "length"
            yield RequestOutput(
                request_id=request.request_id,
                new_token_ids=[token],
                finished=reason is not None,
                finish_reason=reason,
                logprobs=self._logprobs(token, sampling.logprobs),
                num_prompt_tokens=len(prompt),
                num_cached_prompt_tokens=cached,
            )
            if reason is not None:
                return

    @staticmethod
    async def _aborted_within(state: _FakeRequest, delay: float) -> bool:
        if state.aborted.is_set():
            return True
        if delay <= 0:
            await asyncio.sleep(0)  # let other requests and the server's writers run
            return state.aborted.is_set()
        try:
            await asyncio.wait_for(state.aborted.wait(), timeout=delay)
            return True
        except TimeoutError:
            return False

    def _final(self, request: GenerationRequest, reason: FinishReason, cached: int) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[],
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_prompt_tokens=cached,
        )

    def _logprobs(self, token: int, top_n: int | None) -> list[TokenLogprob] | None:
        """Made-up but well-formed log-probabilities: the chosen token is always the most likely."""
        if top_n is None:
            return None
        chosen = -0.25
        alternatives = [(token, chosen)]
        for i in range(1, top_n):
            alternatives.append(((token + i) % self.vocab_size, chosen - i))
        return [TokenLogprob(token_id=token, logprob=chosen, top=tuple(alternatives[:top_n]))]

    def _blocks_for(self, state: _FakeRequest) -> int:
        tokens = len(state.request.prompt_token_ids) + state.num_output_tokens
        return math.ceil(tokens / self.block_size)

    def _count_prefix_hits(self, prompt: list[int]) -> int:
        """Tokens of `prompt` in full blocks whose whole prefix was seen before; remembers this prompt."""
        hits, counting = 0, True
        for end in range(self.block_size, len(prompt) + 1, self.block_size):
            key = tuple(prompt[:end])
            if counting and key in self._seen_prefix_blocks:
                hits = end
            else:
                counting = False
                self._seen_prefix_blocks.add(key)
        self._prefix_hit_tokens += hits
        return hits
