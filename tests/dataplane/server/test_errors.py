"""Bad requests get an OpenAI-style 4xx with a reason, and the next good request still succeeds."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_testlib import MODEL

GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

# (id, path, raw body or JSON, status, param or None)
CASES = [
    ("unknown-model", "/v1/completions", GOOD | {"model": "gpt-17"}, 404, "model"),
    ("unknown-model-chat", "/v1/chat/completions", CHAT | {"model": "gpt-17"}, 404, "model"),
    ("malformed-json", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("invalid-utf8", "/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    ("not-an-object", "/v1/chat/completions", b"[1, 2, 3]", 400, None),
    ("empty-body", "/v1/completions", b"", 400, None),
    ("missing-model", "/v1/completions", {"prompt": "Hello"}, 400, "model"),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty-messages", "/v1/chat/completions", CHAT | {"messages": []}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", CHAT | {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("string-max-tokens", "/v1/completions", GOOD | {"max_tokens": "5"}, 400, "max_tokens"),
    ("string-temperature", "/v1/completions", GOOD | {"temperature": "hot"}, 400, "temperature"),
    ("temperature-too-high", "/v1/completions", GOOD | {"temperature": 7.5}, 400, "temperature"),
    ("prompt-dict", "/v1/completions", GOOD | {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("messages-string", "/v1/chat/completions", CHAT | {"messages": "hi"}, 400, "messages"),
    ("negative-max-tokens", "/v1/completions", GOOD | {"max_tokens": -5}, 400, "max_tokens"),
    ("zero-max-tokens", "/v1/chat/completions", CHAT | {"max_tokens": 0}, 400, "max_tokens"),
    ("huge-max-tokens", "/v1/completions", GOOD | {"max_tokens": 10**12}, 400, "max_tokens"),
    ("huge-max-completion-tokens", "/v1/chat/completions", CHAT | {"max_completion_tokens": 10**6}, 400,
     "max_tokens"),
    ("n-0", "/v1/completions", GOOD | {"n": 0}, 400, "n"),
    ("unknown-field", "/v1/completions", GOOD | {"frobnicate": True}, 400, "frobnicate"),
    ("empty-stop", "/v1/completions", GOOD | {"stop": [""]}, 400, "stop"),
    ("token-id-out-of-range", "/v1/completions", GOOD | {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("negative-token-id", "/v1/completions", GOOD | {"prompt": [1, -2]}, 400, "prompt"),
    ("empty-prompt-in-batch", "/v1/completions", GOOD | {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("echo-with-logprobs", "/v1/completions", GOOD | {"echo": True, "logprobs": 1}, 400, "echo"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "top_logprobs"),
    ("image-content", "/v1/chat/completions",
     CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content.0.type"),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as h:
        yield h


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_answered_and_the_server_keeps_serving(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error")
    assert err["param"] == param
    ok = http.post("/v1/completions", json=GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_prompt_longer_than_the_context(http, server):
    too_long = [5] * (server.engine.max_model_len + 1)
    r = http.post("/v1/completions", json=GOOD | {"prompt": too_long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt" and "no room" in r.json()["error"]["message"]
    long_chat = CHAT | {"messages": [{"role": "user", "content": "Hello, world! " * server.engine.max_model_len}]}
    del long_chat["max_tokens"]
    r = http.post("/v1/chat/completions", json=long_chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    just_fits = [5] * (server.engine.max_model_len - 2)
    assert http.post("/v1/completions", json=GOOD | {"prompt": just_fits, "max_tokens": 2}).status_code == 200


def test_unknown_route_and_wrong_method_are_json(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="Hello", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e2:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=10**7)
    assert e2.value.code == "context_length_exceeded"
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].finish_reason
