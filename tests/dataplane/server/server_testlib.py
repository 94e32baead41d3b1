"""Server test helpers: a real server on 127.0.0.1 with its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvfleet.dataplane.engine.api import AsyncEngine
from kvfleet.dataplane.engine.fake import FakeEngine
from kvfleet.dataplane.model.tokenizer import Tokenizer
from kvfleet.dataplane.server.app import build_app, start_server

MODEL = "tiny"


@dataclass
class LiveServer:
    """A running server: its URL, engine and the loop it runs on."""

    base_url: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    kind: str
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Awaitable[Any]) -> Any:
        """Run a coroutine on the server's loop (e.g. to read engine state safely)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)  # type: ignore[arg-type]

    def wait_until(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.02)


def run_server(make_engine: Callable[[], AsyncEngine], tokenizer: Tokenizer, kind: str, **app_kw: Any):
    """Start a server in a daemon thread; returns (LiveServer, stop function)."""
    ready: Future[LiveServer] = Future()
    stop_event: list[asyncio.Event] = []

    async def main() -> None:
        try:
            engine = make_engine()
            app = build_app(engine, tokenizer, [MODEL, "tiny-alias"], **app_kw)
            runner, url = await start_server(app, "127.0.0.1", 0)
        except BaseException as e:  # noqa: BLE001 - surface start-up failures to the test
            ready.set_exception(e)
            raise
        stop = asyncio.Event()
        stop_event.append(stop)
        ready.set_result(LiveServer(url, engine, tokenizer, kind, asyncio.get_running_loop()))
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    live = ready.result(timeout=120)

    def stop() -> None:
        live.loop.call_soon_threadsafe(stop_event[0].set)
        thread.join(timeout=30)

    return live, stop


def make_fake(tokenizer: Tokenizer, **kw: Any) -> FakeEngine:
    return FakeEngine(max_model_len=512, eos_token_ids=tokenizer.eos_token_ids, vocab_size=tokenizer.vocab_size,
                      **kw)


def make_tiny_engine(tiny_dir: Path) -> AsyncEngine:
    from kvfleet.dataplane.config import EngineConfig
    from kvfleet.dataplane.engine.async_engine import AsyncLLMEngine

    return AsyncLLMEngine.from_config(EngineConfig(model_dir=str(tiny_dir), dtype="float32", device="cpu",
                                                   max_num_seqs=16, num_kv_blocks=256, block_size=16))
