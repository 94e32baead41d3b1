"""A client that goes away mid-request cancels it: the engine stops and its KV blocks are freed."""

from __future__ import annotations

import re
import threading
import time

import httpx
from server_testlib import MODEL


def _aborted(http: httpx.Client) -> float:
    m = re.search(rf'kvfleet_requests_finished_total{{finish_reason="abort",model="{MODEL}"}} (\S+)',
                  http.get("/metrics").text)
    return float(m.group(1)) if m else 0.0


def _long_body(server, stream: bool) -> dict:
    prompt = "Hello, world! How are you today?"
    budget = server.engine.max_model_len - len(server.tokenizer.encode(prompt)) - 1
    return {"model": MODEL, "prompt": prompt, "max_tokens": budget, "temperature": 0.0, "ignore_eos": True,
            "stream": stream}


def test_stream_disconnect_aborts_and_frees_blocks(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        blocks_before = server.engine.stats().kv_blocks_used
        aborted_before = _aborted(http)
        with http.stream("POST", "/v1/completions", json=_long_body(server, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [line for _, line in zip(range(6), lines, strict=False)]
            assert any(line.startswith("data: {") for line in received)
            assert server.engine.stats().num_running + server.engine.stats().num_waiting >= 1
        # leaving the block closes the connection long before max_tokens could be generated
        t0 = time.monotonic()
        server.wait_until(lambda: server.engine.stats().num_running == 0, timeout=60)
        server.wait_until(lambda: server.engine.stats().kv_blocks_used <= blocks_before, timeout=10)
        assert time.monotonic() - t0 < 10
        server.wait_until(lambda: _aborted(http) == aborted_before + 1, timeout=60)
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_non_streaming_disconnect_aborts(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        aborted_before = _aborted(http)
        client = httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(30, read=0.3))

        def doomed() -> None:
            try:
                client.post("/v1/completions", json=_long_body(server, stream=False))
            except httpx.ReadTimeout:
                pass  # the client gives up while the server is still generating
            finally:
                client.close()

        t = threading.Thread(target=doomed)
        t.start()
        server.wait_until(lambda: server.engine.stats().num_running + server.engine.stats().num_waiting >= 1, timeout=60)
        t.join()
        server.wait_until(lambda: server.engine.stats().num_running == 0, timeout=60)
        server.wait_until(lambda: _aborted(http) == aborted_before + 1, timeout=60)
