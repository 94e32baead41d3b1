"""The real SmolLM2-135M-Instruct through the server with the SDK: JSON-schema output is valid and the
model closes it itself (finish_reason 'stop'), with content that answers the question (slow)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from kvfleet.dataplane.model.tokenizer import Tokenizer
from server_testlib import MODEL, make_tiny_engine, run_server

pytestmark = pytest.mark.slow
smollm2 = pytest.importorskip("kvfleet.dataplane.model.smollm2", reason="SmolLM2 import not available")

CITY = {
    "type": "object",
    "properties": {"country": {"type": "string", "enum": ["France", "Germany", "Italy", "Spain"]},
                   "capital": {"type": "string", "maxLength": 20}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def sdk():
    d = smollm2.smollm2_dir()
    server, stop = run_server(lambda: make_tiny_engine(d), Tokenizer.from_dir(d), "engine")
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c
    stop()


def test_smollm2_answers_in_the_schema(sdk):
    r = sdk.chat.completions.create(
        model=MODEL, max_tokens=40, temperature=0.0, n=1,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON with the "
                                              "country and its capital."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    data = json.loads(choice.message.content)
    jsonschema.validate(data, CITY)
    assert data["country"] == "France" and "Paris" in data["capital"]
