"""The unmodified `openai` SDK against a live server: completions, chat, streaming, usage, stop, concurrency."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from server_testlib import MODEL

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world! café 東京"}]


def test_completion_text_and_usage_match_the_tokenizer(client, server):
    prompt = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, **GREEDY)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(server.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    if server.kind == "fake":  # the fake echoes the prompt (after its BOS, which decodes to nothing)
        assert prompt.startswith(choice.text) and choice.text


def test_completion_accepts_token_ids_and_the_alias_name(client, server):
    ids = server.tokenizer.encode("Hello, world!")
    r = client.completions.create(model="tiny-alias", prompt=ids, max_tokens=3, **GREEDY)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3


def test_chat_non_streaming(client, server):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=6, **GREEDY)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(server.tokenizer.encode_chat(MESSAGES))
    assert r.usage.completion_tokens == 6


def test_chat_streaming_equals_non_streaming_and_reports_usage(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, **GREEDY)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert all(c.usage is None for c in content)
    last = chunks[-1]
    assert not last.choices and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_streaming_without_usage(client):
    kw = dict(model=MODEL, prompt="Numbers matter too: 0 1 2 3", max_tokens=9, **GREEDY)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(getattr(c, "usage", None) is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_truncates_and_finishes_with_stop(client, server, stream):
    prompt = "Hello, world! How are you today? I am fine, thank you."
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, **GREEDY).choices[0].text
    text = base.replace("\ufffd", "")
    assert len(text) >= 8, f"need some text to cut, got {base!r}"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = base[: base.index(stop)]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=40, stop=[stop, "never-appears"], **GREEDY)
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw)
        got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens < 40
    assert (got, reason) == (expected, "stop")
    server.wait_until(lambda: server.engine.stats().num_running == 0)


def test_eos_ends_with_stop(client, server):
    if server.kind != "fake":
        pytest.skip("a random tiny model emits EOS when it likes; the fake emits it where the chat prompt has one")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=50,
                                       temperature=0.0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "user\nHi"


def test_logprobs(client, server):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True,
                                       top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=2, **GREEDY)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="Hello, world!", max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"ignore_eos": True, "top_k": 20})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_eight_concurrent_clients(server):
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                  max_tokens=10 + i, **GREEDY)
        if i % 2:
            stream = await c.chat.completions.create(stream=True, **kw)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            return text, 10 + i
        r = await c.chat.completions.create(**kw)
        return r.choices[0].message.content, r.usage.completion_tokens

    async def main() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    results = asyncio.run(main())
    for i, (text, n) in enumerate(results):
        assert isinstance(text, str) and n == 10 + i
        if server.kind == "fake":
            assert text.startswith("user\nQu")
    server.wait_until(lambda: server.engine.stats().num_running == 0)


def test_slo_class_header_and_body_reach_the_engine(server):
    seen: list[str | None] = []
    engine = server.engine
    original = engine.generate

    def spy(request):
        seen.append(request.slo_class)
        return original(request)

    engine.generate = spy  # type: ignore[method-assign]
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as h:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
            assert h.post("/v1/completions", json=body, headers={"x-kvfleet-slo-class": "chat"}).status_code == 200
            assert h.post("/v1/completions", json=body | {"kvfleet_slo_class": "batch"}).status_code == 200
    finally:
        del engine.generate
    assert seen == ["chat", "batch"]


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny-alias"]
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, **GREEDY)
    with httpx.Client(base_url=server.base_url, timeout=30) as h:
        assert h.get("/health").json()["status"] == "ok"
        metrics = h.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("kvfleet_http_requests_total", "kvfleet_prompt_tokens_total", "kvfleet_generation_tokens_total",
                 "kvfleet_time_to_first_token_seconds_bucket", "kvfleet_time_per_output_token_seconds_bucket",
                 "kvfleet_e2e_request_latency_seconds_count", "kvfleet_num_requests_running",
                 "kvfleet_num_requests_waiting", "kvfleet_kv_blocks_used", "kvfleet_kv_blocks_total",
                 "kvfleet_prefix_cache_hit_tokens_total"):
        assert name in text, name
    assert 'kvfleet_http_requests_total{endpoint="/v1/completions",status="200"}' in text
