"""Fixtures: `server` is a live server over the FakeEngine and over the real engine on the tiny Llama.

Every test that uses `server` runs twice (params "fake" and "engine"). Both
use the tiny model's real tokenizer, so usage counts can be checked against it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from kvfleet.dataplane.engine.api import AsyncEngine
from kvfleet.dataplane.model.tiny import write_tiny_llama
from kvfleet.dataplane.model.tokenizer import Tokenizer
from server_testlib import LiveServer, make_fake, make_tiny_engine, run_server


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module", params=["fake", "engine"])
def server(request: pytest.FixtureRequest, tiny_dir: Path, tokenizer: Tokenizer):
    """A live server over the FakeEngine ("fake") or the real engine on the tiny Llama ("engine")."""
    if request.param == "fake":
        factory: Callable[[], AsyncEngine] = lambda: make_fake(tokenizer, token_delay_s=0.002)  # noqa: E731
    else:
        factory = lambda: make_tiny_engine(tiny_dir)  # noqa: E731
    live, stop = run_server(factory, tokenizer, request.param)
    yield live
    stop()


@pytest.fixture
def client(server: LiveServer):
    import openai

    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c
