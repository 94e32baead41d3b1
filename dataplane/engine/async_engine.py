"""`AsyncLLMEngine`: the real `AsyncEngine` — the step loop in a background thread.

Threads: the asyncio loop (server handlers) and one engine thread that alone
touches the `LLMEngine`. They talk through two one-way channels:

- loop -> engine: a deque of commands (`add`, `abort`) plus an Event to wake
  an idle engine thread;
- engine -> loop: after each step ONE `loop.call_soon_threadsafe` hands the
  step's `RequestOutput`s to the per-request `asyncio.Queue`s.

torch releases the GIL inside kernels, so the loop stays responsive while a
step computes. Cancelling a consumer of `generate` (client disconnect) runs
the generator's `finally`, which sends `abort`: the request's blocks are freed
at the next step boundary.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import AsyncEngine, EngineStats, GenerationRequest, KVHandoff, RequestOutput
from kvfleet.dataplane.engine.llm_engine import LLMEngine

T = TypeVar("T")


class AsyncLLMEngine(AsyncEngine):
    """Shares one `LLMEngine` among many asyncio tasks."""

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._idle_wait_s = idle_wait_s
        self._cmds: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._stats = engine.stats()
        self.error: BaseException | None = None  # set if the step loop died
        self.recomputed = 0  # prefilled requests whose pushed KV could not be used

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        """Load the model and build the engine (call `start()` before serving, or let `generate` do it)."""
        return cls(LLMEngine.from_config(config))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step (never blocks on the engine thread)."""
        return self._stats

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvfleet-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the loop; unfinished requests end with finish_reason 'abort'."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- requests ------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Yield increments until one with `finished=True`. Raises ValueError for an invalid request."""
        return self._run_request(request, ("add", request))

    def continue_prefilled(self, request: GenerationRequest, first_token: int,
                           kv: KVHandoff | None) -> AsyncIterator[RequestOutput]:
        """Decode role: generate after `first_token` from pushed KV (see `LLMEngine.add_prefilled`).

        The increments never repeat the first token. A hand-off that cannot be used is recomputed;
        `self.recomputed` counts those."""
        return self._run_request(request, ("prefilled", (request, first_token, kv)))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result (or raise its error)."""
        await self.start()
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._send("call", (fn, fut))
        return await fut

    async def _run_request(self, request: GenerationRequest, command: tuple[str, Any]) -> AsyncIterator[RequestOutput]:
        rid = request.request_id
        n = len(request.prompt_token_ids)
        if n == 0 or n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; need 1 .. {self.max_model_len - 1}")
        if rid in self._queues:
            raise ValueError(f"duplicate request id {rid!r}")
        if self.error is not None:
            raise RuntimeError(f"engine loop failed: {self.error!r}")
        await self.start()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = queue
        self._send(*command)
        done = False
        remaining = request.sampling.n  # finished outputs still due (one per choice)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                remaining -= item.finished
                done = remaining == 0
                yield item
                if done:
                    return
        finally:
            self._queues.pop(rid, None)
            if not done:  # consumer cancelled or stopped early
                self._send("abort", rid)

    async def abort(self, request_id: str) -> None:
        """End a request; its `generate` yields a final output with reason 'abort'."""
        self._send("abort", request_id)

    def _send(self, cmd: str, arg: Any) -> None:
        self._cmds.append((cmd, arg))
        self._wake.set()

    # -- engine thread ---------------------------------------------------------

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                outs = self._drain_commands()
                if eng.has_unfinished():
                    outs += eng.step()
                    self._stats = eng.stats()
                    self._deliver(outs)
                else:
                    self._stats = eng.stats()
                    self._deliver(outs)
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - surface to every waiting request
            self.error = e
            self._fail_all(e)
            raise
        finally:
            outs = self._drain_commands()
            for rid in list(eng.seqs):
                final = eng.abort(rid)
                if final is not None:
                    outs.append(final)
            self._stats = eng.stats()
            self._deliver(outs)

    def _drain_commands(self) -> list[Any]:
        outs: list[Any] = []
        while self._cmds:
            cmd, arg = self._cmds.popleft()
            if cmd == "add":
                try:
                    self.engine.add_request(arg)
                except ValueError as e:
                    outs.append((arg.request_id, e))
            elif cmd == "abort":
                outs += self.engine.abort_all(arg)
            elif cmd == "prefilled":
                request, first, kv = arg
                try:
                    self.recomputed += self.engine.add_prefilled(request, first, kv)
                except ValueError as e:
                    outs.append((request.request_id, e))
            elif cmd == "call":
                fn, fut = arg
                try:
                    result, err = fn(self.engine), None
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    result, err = None, e
                self._resolve(fut, result, err)
        return outs

    def _resolve(self, fut: asyncio.Future[Any], result: Any, err: BaseException | None) -> None:
        def done() -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(result)

        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(done)

    def _deliver(self, outs: list[Any]) -> None:
        if outs and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._dispatch, outs)
            except RuntimeError:  # loop closed meanwhile
                pass

    def _dispatch(self, outs: list[Any]) -> None:
        """On the event loop: route each output to its request's queue."""
        for o in outs:
            if isinstance(o, tuple):
                rid, err = o
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(err)
                continue
            q = self._queues.get(o.request_id)
            if q is not None:
                q.put_nowait(o)

    def _fail_all(self, err: BaseException) -> None:
        if self._loop is None or self._loop.is_closed():
            return

        def fail() -> None:
            for q in self._queues.values():
                q.put_nowait(RuntimeError(f"engine loop failed: {err!r}"))

        try:
            self._loop.call_soon_threadsafe(fail)
        except RuntimeError:
            pass
