"""Fuzz the HTTP API from the OpenAPI document the server publishes (hypothesis, schema_strategies.py).

Requests are drawn from the document's own request schemas, then often broken: a field set to a
value of the wrong shape, a required field dropped, an unknown one added, a body that is not a JSON
object or not JSON or not UTF-8, a wrong method, an unknown route, odd headers. The properties:

- no 5xx and no hang (every answer within the client timeout), whatever was sent;
- every request the published schema refuses gets a 4xx; every 4xx carries OpenAI's error object
  with a non-empty message (the reason);
- a 200 is a complete answer (streams end with `data: [DONE]`);
- afterwards the server still answers a fixed request exactly as before, with nothing left running.

Bounded for CI: a few hundred cases against the FakeEngine, a short run against the tiny real model.
Failures are collected (not shrunk) so a run reports how many cases it ran and every failure found.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_strategies import from_schema
from server_testlib import MODEL, LiveServer, make_fake, make_tiny_engine, run_server

CASES = {"fake": 30, "engine": 4}  # per class of request (HOWS): 330 and 44 cases
TIMEOUT_S = 60.0
ROUTES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
UNSUPPORTED = {"n", "logit_bias", "presence_penalty", "frequency_penalty", "echo", "suffix", "best_of"}
WRONG_VALUES = [None, "", "x", "💥\u0000\u202e", -1, 0, 1.5, -0.0, 10**30, -(10**30), True, False, [], {}, [1, "a"],
                {"a": {"b": []}}, "x" * 5000, [[1, 2], [3]], [-5], [2**40]]


def inline(schema: Any, components: dict[str, Any]) -> Any:
    """The schema with its `#/components/schemas/...` references replaced by their targets."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return inline(components[schema["$ref"].rsplit("/", 1)[1]], components)
        return {k: inline(v, components) for k, v in schema.items()}
    if isinstance(schema, list):
        return [inline(v, components) for v in schema]
    return schema


@pytest.fixture(scope="module", params=["fake", "engine"])
def live(request: pytest.FixtureRequest, tiny_dir: Path, tokenizer: Any):
    if request.param == "fake":
        factory = lambda: make_fake(tokenizer, token_delay_s=0.0)  # noqa: E731
    else:
        factory = lambda: make_tiny_engine(tiny_dir)  # noqa: E731
    server, stop = run_server(factory, tokenizer, request.param)
    yield server
    stop()


def _model_values() -> st.SearchStrategy[str]:
    return st.one_of(st.just(MODEL), st.just("tiny-alias"), st.text(max_size=20))


HOWS = ("plausible", "valid", "wrong-value", "drop-required", "unknown-field", "not-object", "not-json",
        "not-utf8", "wrong-method", "unknown-route", "odd-header")


def request_strategy(doc: dict[str, Any], how: str) -> st.SearchStrategy[dict[str, Any]]:
    """A case of one class `how`: method, path, headers and raw body, plus what the schema says of the body."""
    components = doc["components"]["schemas"]
    bodies = {path: inline(doc["components"]["schemas"][name], components) for path, name in ROUTES.items()}

    @st.composite
    def case(draw: st.DrawFn) -> dict[str, Any]:
        path = draw(st.sampled_from(sorted(ROUTES)))
        schema = bodies[path]
        body: Any = draw(from_schema(schema))
        if draw(st.booleans()):  # mostly a served model, so generation is reached, sometimes not
            body["model"] = draw(_model_values())
        method, headers, raw = "POST", {"content-type": "application/json"}, None
        if how == "plausible":  # a served model and no value the server documents it refuses: generation runs
            body = {k: v for k, v in body.items() if k not in UNSUPPORTED}
            body["model"] = MODEL
            if isinstance(body.get("prompt"), list):
                body["prompt"] = draw(st.text(max_size=40))
        elif how == "wrong-value":
            field = draw(st.sampled_from(sorted(schema["properties"])))
            body[field] = copy.deepcopy(draw(st.sampled_from(WRONG_VALUES)))
        elif how == "drop-required":
            body.pop(draw(st.sampled_from(sorted(schema["required"]))))
        elif how == "unknown-field":
            body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in schema["properties"]))] = 1
        elif how == "not-object":
            body = draw(st.sampled_from([[body], "text", 3, None, True]))
        elif how == "not-json":
            raw = draw(st.sampled_from([b"", b"{", b"{\"model\": }", b"NaN", b"{\"temperature\": NaN}",
                                        b"{\"max_tokens\": Infinity, \"model\": \"tiny\"}", b"\x00\x01", b"[1,2"])
                       | st.binary(max_size=64))
        elif how == "not-utf8":
            raw = b"{\"model\": \"\xff\xfe\"}"
        elif how == "wrong-method":
            method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
        elif how == "unknown-route":
            path = draw(st.from_regex(r"\A/[a-z0-9_./-]{0,30}\Z").filter(
                lambda p: p not in ROUTES and p not in ("/v1/models", "/health", "/metrics", "/openapi.json")))
        elif how == "odd-header":
            headers["x-kvfleet-slo-class"] = draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                                                          max_size=40))
            headers["content-type"] = draw(st.sampled_from(["application/json", "text/plain", "", "x/y; q=1"]))
        if raw is None:
            raw = json.dumps(body).encode()
        valid = how in ("valid", "plausible", "odd-header") and _schema_valid(schema, body)
        if how == "wrong-value" or how == "drop-required":
            valid = _schema_valid(schema, body)  # a wrong value can happen to be allowed
        return {"how": how, "method": method, "path": path, "headers": headers, "raw": raw,
                "schema_valid": valid, "stream": isinstance(body, dict) and body.get("stream") is True}

    return case()


def _schema_valid(schema: dict[str, Any], body: Any) -> bool:
    try:
        jsonschema.Draft202012Validator(schema).validate(body)
    except jsonschema.ValidationError:
        return False
    return True


def check(http: httpx.Client, case: dict[str, Any], statuses: Counter[int]) -> str | None:
    """None when the answer is acceptable, else why not."""
    try:
        resp = http.request(case["method"], case["path"], content=case["raw"], headers=case["headers"])
    except httpx.TimeoutException:
        return f"no answer within {TIMEOUT_S}s (hang)"
    except httpx.HTTPError as exc:
        return f"transport error {exc!r}"
    statuses[resp.status_code] += 1
    if resp.status_code >= 500:
        return f"{resp.status_code}: {resp.text[:300]}"
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"{resp.status_code} without OpenAI's error object: {resp.text[:300]}"
        if not isinstance(message, str) or not message:
            return f"{resp.status_code} without a reason"
        return None
    if case["how"] not in ("valid", "plausible", "odd-header", "wrong-value", "drop-required"):
        return f"{resp.status_code} for a {case['how']} request"
    if not case["schema_valid"]:
        return f"{resp.status_code} for a body the published schema refuses"
    if case["stream"] and "text/event-stream" in resp.headers.get("content-type", ""):
        if not resp.text.rstrip().endswith("data: [DONE]"):
            return "a stream that did not end with [DONE]"
    return None


REFERENCE = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "seed": 1}


def test_fuzz_the_http_api_from_its_openapi_document(live: LiveServer, record_property: Any) -> None:
    with httpx.Client(base_url=live.base_url, timeout=TIMEOUT_S) as http:
        doc = http.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.1") and set(ROUTES) <= set(doc["paths"])
        before = http.post("/v1/completions", json=REFERENCE).json()["choices"][0]["text"]
        ran: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        failures: list[str] = []

        for how in HOWS:

            @settings(max_examples=CASES[live.kind], deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(request_strategy(doc, how))
            def fuzz(case: dict[str, Any]) -> None:
                ran[case["how"]] += 1
                problem = check(http, case, statuses)
                if problem is not None:
                    failures.append(f"{case['how']} {case['method']} {case['path']} {case['raw'][:200]!r}: {problem}")

            fuzz()
        # still serving, correctly, with nothing left behind
        after = http.post("/v1/completions", json=REFERENCE).json()["choices"][0]["text"]
        health = http.get("/health").json()
    total = sum(ran.values())
    live.wait_until(lambda: live.engine.stats().num_running == 0 and live.engine.stats().num_waiting == 0)
    record_property("fuzz_cases", total)
    record_property("fuzz_failures", len(failures))
    record_property("fuzz_statuses", dict(statuses))
    print(f"{live.kind}: {total} cases {dict(ran)}; statuses {dict(statuses)}; {len(failures)} failures")
    assert total >= CASES[live.kind] * len(HOWS) * 0.9
    assert not failures, f"{len(failures)} of {total} cases failed:\n" + "\n".join(failures[:50])
    assert after == before and health["status"] == "ok"
    assert statuses[200] >= ran["plausible"] // 2, "too few requests reached generation for the fuzz to mean much"


BASES = {"/v1/completions": {"model": MODEL, "prompt": "Hello there", "max_tokens": 2},
         "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}


def test_every_field_with_every_wrong_value(live: LiveServer, record_property: Any) -> None:
    """The exhaustive corner of the fuzz: each documented field of each route set to each odd value."""
    failures, ran = [], 0
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=live.base_url, timeout=TIMEOUT_S) as http:
        doc = http.get("/openapi.json").json()
        components = doc["components"]["schemas"]
        for path, name in ROUTES.items():
            schema = inline(components[name], components)
            for field in sorted(schema["properties"]):
                for value in WRONG_VALUES:
                    body = {**BASES[path], field: copy.deepcopy(value)}
                    case = {"how": "wrong-value", "method": "POST", "path": path, "raw": json.dumps(body).encode(),
                            "headers": {"content-type": "application/json"},
                            "schema_valid": _schema_valid(schema, body), "stream": body.get("stream") is True}
                    ran += 1
                    if (problem := check(http, case, statuses)) is not None:
                        failures.append(f"{path} {field}={value!r:.60}: {problem}")
        assert http.get("/health").json()["status"] == "ok"
    live.wait_until(lambda: live.engine.stats().num_running == 0 and live.engine.stats().num_waiting == 0)
    record_property("grid_cases", ran)
    record_property("grid_failures", len(failures))
    print(f"{live.kind}: {ran} field x value cases; statuses {dict(statuses)}; {len(failures)} failures")
    assert not failures, f"{len(failures)} of {ran} cases failed:\n" + "\n".join(failures[:60])


def test_the_engine_refuses_a_seed_it_cannot_use_and_keeps_serving(live: LiveServer) -> None:
    """Found by the fuzz: a seed beyond 64 bits reached torch inside a step and ended the engine loop,
    so every later request got a 500. The HTTP schema bounds it now, and the engine refuses it too."""
    from kvfleet.dataplane.engine.api import SEED_MAX, GenerationRequest, SamplingParams

    async def generate(rid: str, seed: int) -> list[int]:
        req = GenerationRequest(rid, live.tokenizer.encode("Hello"),
                                SamplingParams(max_tokens=2, temperature=1.0, seed=seed))
        return [t for out in [o async for o in live.engine.generate(req)] for t in out.new_token_ids]

    if live.kind == "engine":
        with pytest.raises(ValueError, match="seed"):
            live.call(generate("huge-seed", 2**70))
    assert len(live.call(generate("after", SEED_MAX))) == 2
