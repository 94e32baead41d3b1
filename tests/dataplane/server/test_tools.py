"""Tools with the unmodified SDK: a tiny model whose chat template knows tools (Hermes style), constrained
calls (named, required) whose arguments always parse against the schema, streamed and not, a round trip
with the tool's result, the parser of free ("auto") replies, and the 400 for a template without tools."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from kvfleet.dataplane.model.tiny import write_tiny_llama
from kvfleet.dataplane.model.tokenizer import Tokenizer
from kvfleet.dataplane.server.tools import NamedToolChoice, Tool, ToolStream, parse
from server_testlib import MODEL, make_tiny_engine, run_server

TOOL_TEMPLATE = (
    "{{ bos_token }}"
    # (names only: the tiny model's context is short)
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny-tools"), seed=0)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": TOOL_TEMPLATE}))
    server, stop = run_server(lambda: make_tiny_engine(d), Tokenizer.from_dir(d), "engine")
    yield server
    stop()


@pytest.fixture(scope="module")
def sdk(tools_server):
    with openai.OpenAI(base_url=tools_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _check(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_choice_round_trip(sdk):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(5):
        r = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, seed=seed,
                                        temperature=1.0, max_tokens=60)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        (call,) = msg.tool_calls
        assert call.function.name == "get_weather"
        _check(call)
    # the round trip: the call and the tool's answer go back; the model replies with text
    follow = ASK + [msg.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    reply = sdk.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, tool_choice="none", max_tokens=5,
                                        temperature=0.0, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.tool_calls is None and reply.usage.completion_tokens == 5


def test_required_tool_choice_makes_valid_calls(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=4, seed=3,
                                    temperature=1.0, max_tokens=100, parallel_tool_calls=False)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check(choice.message.tool_calls[0])
    # parallel calls: a random model keeps calling until the cap (MAX_CALLS)
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=5,
                                    temperature=1.0, max_tokens=400)
    assert r.choices[0].finish_reason == "tool_calls" and 1 <= len(r.choices[0].message.tool_calls) <= 8
    for call in r.choices[0].message.tool_calls:
        _check(call)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_calls_assemble_like_the_non_streamed(sdk, tool_choice):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, seed=7, temperature=1.0,
              max_tokens=400)
    full = sdk.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in sdk.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            reasons.append(ch.finish_reason)
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = d.id or c["id"]
                c["name"] += (d.function.name or "") if d.function else ""
                c["arguments"] += (d.function.arguments or "") if d.function else ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in full]
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())


def test_tool_errors_name_the_parameter(sdk):
    cases = [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tools": None, "tool_choice": "required"}, "tool_choice"),
             ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, "response_format")]
    for extra, param in cases:
        kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=3) | extra
        kw = {k: v for k, v in kw.items() if v is not None}
        with pytest.raises(openai.BadRequestError) as e:
            sdk.chat.completions.create(**kw)
        assert e.value.body["param"] == param, extra


def test_template_without_tools_is_a_clear_400(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=3)
    assert e.value.body["param"] == "tools" and "template" in e.value.body["message"]


# -- parsing free ("auto") replies -------------------------------------------------------------

T = [Tool.model_validate(t) for t in TOOLS]


def test_auto_parses_hermes_and_bare_json_and_leaves_bad_calls_as_text():
    text = 'Let me look.<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
    content, calls = parse(text, T, "auto")
    assert content == "Let me look." and calls[0]["function"]["name"] == "get_time"
    assert json.loads(calls[0]["function"]["arguments"]) == {"tz": "UTC"}
    content, calls = parse('{"name": "get_weather", "parameters": {"city": "Lima"}}', T, None)
    assert content is None and calls[0]["function"]["name"] == "get_weather"
    for bad in ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', "<tool_call>{not json",
                '{"just": "json"}', "plain text"):
        assert parse(bad, T, "auto") == (bad, [])
    assert parse(text, T, "none") == (text, [])
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}})
    assert parse('{"tz": "CET"}', T, named)[1][0]["function"]["arguments"] == '{"tz": "CET"}'


def test_auto_stream_sends_text_and_holds_back_a_call():
    ts = ToolStream(T, "auto")
    pieces = ["Hello", " there <tool", '_call>{"name": "get_time", ', '"arguments": {"tz": "UTC"}}', "</tool_call>"]
    sent = [d for p in pieces for d in ts.push(p)]
    assert "".join(d["content"] for d in sent) == "Hello there "
    final, called = ts.finish()
    assert called and final[0]["tool_calls"][0]["function"]["name"] == "get_time"
    plain = ToolStream(T, "auto")
    sent = [d for p in ["Just <to", "ols> text"] for d in plain.push(p)] + plain.finish()[0]
    assert "".join(d["content"] for d in sent) == "Just <tools> text"


# -- "auto" end to end: the FakeEngine echoes its prompt from `seed` on, so a user message holding a call
# -- comes back as the reply, up to <|im_end|> (an eos of the tiny tokenizer)

CALL_TEXT = 'Let me check.<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'


@pytest.fixture(scope="module")
def fake_tools(tmp_path_factory):
    from server_testlib import make_fake

    d = write_tiny_llama(tmp_path_factory.mktemp("tiny-tools-fake"), seed=0)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": TOOL_TEMPLATE}))
    tok = Tokenizer.from_dir(d)
    server, stop = run_server(lambda: make_fake(tok), tok, "fake")
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c, tok
    stop()


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_call_parsed_from_the_reply(fake_tools, stream):
    sdk, tok = fake_tools
    messages = [{"role": "user", "content": CALL_TEXT}]
    prompt = tok.encode_chat(messages, tools=TOOLS)
    seed = next(k for k in range(len(prompt)) if tok.decode(prompt[k:]).startswith("Let me check."))
    kw = dict(model=MODEL, messages=messages, tools=TOOLS, seed=seed, max_tokens=200)
    if not stream:
        r = sdk.chat.completions.create(**kw).choices[0]
        content, calls, reason = r.message.content, r.message.tool_calls, r.finish_reason
        calls = [(c.function.name, json.loads(c.function.arguments), c.id) for c in calls]
    else:
        content, parts, reason = "", {}, None
        for chunk in sdk.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                content += ch.delta.content or ""
                reason = ch.finish_reason or reason
                for d in ch.delta.tool_calls or []:
                    p = parts.setdefault(d.index, {"name": "", "args": "", "id": None})
                    p["name"] += d.function.name or ""
                    p["args"] += d.function.arguments or ""
                    p["id"] = d.id or p["id"]
        calls = [(p["name"], json.loads(p["args"]), p["id"]) for _, p in sorted(parts.items())]
    assert content == "Let me check." and reason == "tool_calls"
    assert [(n, a) for n, a, _ in calls] == [("get_time", {"tz": "UTC"})] and calls[0][2].startswith("call_")
    # tool_choice "none": the same reply is plain text
    r = sdk.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert r.message.content == CALL_TEXT and r.message.tool_calls is None and r.finish_reason == "stop"
