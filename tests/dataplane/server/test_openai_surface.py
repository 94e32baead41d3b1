"""The OpenAI surface beyond the basics, with the unmodified SDK against the real engine on the tiny
Llama: penalties and logit_bias, batched prompts and echo, n > 1, and precise 400s for bad values."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import openai
import pytest
from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
from server_testlib import MODEL, make_tiny_engine, run_server

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def live(tiny_dir, tokenizer):
    server, stop = run_server(lambda: make_tiny_engine(tiny_dir), tokenizer, "engine")
    yield server
    stop()


@pytest.fixture(scope="module")
def sdk(live):
    with openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.base_url, timeout=60) as h:
        yield h


def _engine_tokens(live, prompt_ids: list[int], sp: SamplingParams) -> list[int]:
    """Token ids straight from the engine behind the server (on the server's loop)."""

    async def run() -> list[int]:
        req = GenerationRequest(f"direct-{uuid.uuid4().hex}", prompt_ids, sp)
        return [t async for o in live.engine.generate(req) for t in o.new_token_ids]

    return live.call(run())


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one(sdk, live):
    # a prompt whose greedy token is one the tokenizer knows (the tiny model's logits are wider)
    for text in (PROMPT, "Hello, world!", "Numbers: 1 2 3", "abc", "The end."):
        ids = live.tokenizer.encode(text)
        greedy = _engine_tokens(live, ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        if greedy[0] < live.tokenizer.vocab_size:
            break
    bias = ((greedy[0], -100.0),)
    banned = _engine_tokens(live, ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                      logit_bias=bias))
    assert banned[0] != greedy[0] and greedy[0] not in banned
    r = sdk.completions.create(model=MODEL, prompt=ids, max_tokens=6, logit_bias={str(greedy[0]): -100}, **GREEDY)
    assert r.choices[0].text == live.tokenizer.decode(banned)
    a = live.tokenizer.encode(" fox", add_bos=False)[-1]
    forced = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=1,
                                    logit_bias={str(a): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == live.tokenizer.decode([a]) * 4


def test_penalties_are_accepted_and_change_greedy_output(sdk):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "a a a a a a"}], max_tokens=24, **GREEDY)
    plain = sdk.chat.completions.create(**kw).choices[0].message.content
    pen = sdk.chat.completions.create(presence_penalty=2.0, frequency_penalty=2.0, **kw).choices[0].message.content
    rep = sdk.chat.completions.create(**(kw | {"extra_body": {"ignore_eos": True, "repetition_penalty": 2.0}}))
    assert isinstance(pen, str) and isinstance(rep.choices[0].message.content, str)
    assert pen != plain or rep.choices[0].message.content != plain


BAD = [
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -3}),
    ("repetition_penalty", {"repetition_penalty": 0}),
    ("logit_bias", {"logit_bias": {"abc": 1}}),
    ("logit_bias", {"logit_bias": {"999999": 1}}),
    ("logit_bias.5", {"logit_bias": {"5": 101}}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 2}),
    ("min_tokens", {"min_tokens": -1}),
    ("seed", {"seed": 2**64}),
    ("seed", {"seed": -(2**63) - 1}),
    ("n", {"n": 129}),
    ("best_of", {"best_of": 0}),
    ("logprobs", {"logprobs": 6}),
]


@pytest.mark.parametrize(("param", "extra"), BAD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD)])
def test_out_of_range_values_get_a_400_naming_the_parameter(http, param, extra):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2} | extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


PROMPTS = ["Hello, world!", "The quick brown fox", "Numbers: 1 2 3 4", "abc def"]


def test_batched_prompts_return_one_choice_per_prompt_in_order(sdk):
    single = [sdk.completions.create(model=MODEL, prompt=p, max_tokens=8, **GREEDY) for p in PROMPTS]
    batch = sdk.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in single]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert batch.usage.completion_tokens == 4 * 8
    chunks = list(sdk.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    texts = ["" for _ in PROMPTS]
    reasons = [None for _ in PROMPTS]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert texts == [c.text for c in batch.choices] and reasons == ["length"] * 4
    assert chunks[-1].usage.completion_tokens == 32


def test_token_id_prompt_batch(sdk, live):
    ids = [live.tokenizer.encode(p) for p in PROMPTS[:2]]
    batch = sdk.completions.create(model=MODEL, prompt=ids, max_tokens=3, **GREEDY)
    assert len(batch.choices) == 2 and batch.usage.prompt_tokens == sum(map(len, ids))


@pytest.mark.parametrize("stream", [False, True])
def test_echo_prepends_the_prompt(sdk, live, stream):
    plain = sdk.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=5, **GREEDY)
    kw = dict(model=MODEL, prompt=PROMPTS, max_tokens=5, echo=True, **GREEDY)
    if stream:
        texts = ["" for _ in PROMPTS]
        for c in sdk.completions.create(stream=True, **kw):
            for ch in c.choices:
                texts[ch.index] += ch.text
    else:
        texts = [c.text for c in sdk.completions.create(**kw).choices]
    assert texts == [p + c.text for p, c in zip(PROMPTS, plain.choices, strict=True)]
    ids = live.tokenizer.encode(PROMPTS[0])
    r = sdk.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, **GREEDY)
    assert r.choices[0].text.startswith(live.tokenizer.decode(ids))


def test_n_4_with_a_seed_is_reproducible_and_runs_one_prefill(sdk, live):
    prompt = f"A prompt seen once {uuid.uuid4().hex}"  # no prefix-cache hit from earlier tests
    before = live.engine.stats().prompt_tokens_computed
    kw = dict(model=MODEL, prompt=prompt, max_tokens=8, n=4, seed=42, temperature=1.0,
              extra_body={"ignore_eos": True})
    r = sdk.completions.create(**kw)
    n_prompt = r.usage.prompt_tokens
    assert live.engine.stats().prompt_tokens_computed - before == n_prompt  # one prefill for four choices
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 32 and all(c.finish_reason == "length" for c in r.choices)
    assert len({c.text for c in r.choices}) > 1
    again = sdk.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    lone = sdk.completions.create(**(kw | {"n": 1, "seed": 43}))  # choice i samples with seed + i
    assert lone.choices[0].text == r.choices[1].text


def test_chat_n_streamed_equals_non_streamed(sdk):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say something"}], max_tokens=10, n=3, seed=5,
              temperature=0.9, extra_body={"ignore_eos": True})
    full = sdk.chat.completions.create(**kw)
    assert len(full.choices) == 3 and full.usage.completion_tokens == 30
    texts, roles = ["", "", ""], [None, None, None]
    for c in sdk.chat.completions.create(stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            roles[ch.index] = roles[ch.index] or ch.delta.role
    assert texts == [c.message.content for c in full.choices] and roles == ["assistant"] * 3


def test_n_with_a_stop_string_ends_choices_separately(sdk):
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=30, n=3, seed=9, temperature=1.0,
              extra_body={"ignore_eos": True})
    base = sdk.completions.create(**kw)
    stop = base.choices[1].text[5:7]
    assert stop.strip(), base.choices[1].text
    r = sdk.completions.create(stop=[stop], **kw)
    for b, c in zip(base.choices, r.choices, strict=True):
        if stop in b.text:
            assert c.text == b.text[:b.text.index(stop)] and c.finish_reason == "stop"
        else:
            assert c.text == b.text and c.finish_reason == "length"


def test_best_of_returns_the_n_most_likely(sdk):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, seed=3, temperature=1.0,
              extra_body={"ignore_eos": True})
    five = sdk.completions.create(n=5, logprobs=0, **kw)
    best = sdk.completions.create(n=2, best_of=5, logprobs=0, **kw)
    ranked = sorted(five.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.usage.completion_tokens == 30
    plain = sdk.completions.create(n=1, best_of=3, **kw)
    assert len(plain.choices) == 1 and plain.choices[0].logprobs is None


def test_best_of_below_n_or_streamed_is_a_400(http):
    for extra, param in (({"n": 3, "best_of": 2}, "best_of"), ({"best_of": 2, "stream": True}, "best_of"),
                         ({"n": 0}, "n"), ({"n": 1000}, "n")):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2} | extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["new", "paid", "shipped"]},
        "priority": {"type": "integer", "minimum": 0, "maximum": 9},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6},
                           "tier": {"enum": ["gold", "silver", None]}},
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "gift": {"type": "boolean"},
    },
    "required": ["status", "priority", "customer", "tags", "gift"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_json_schema_is_always_satisfied(sdk, endpoint):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True}}
    texts = []
    for seed in range(4):
        kw = dict(model=MODEL, max_tokens=120, n=6, seed=100 * seed, temperature=1.2)  # choice i: seed + i
        if endpoint == "chat":
            r = sdk.chat.completions.create(messages=[{"role": "user", "content": "An order, as JSON"}],
                                            response_format=fmt, **kw)
            texts += [(c.message.content, c.finish_reason) for c in r.choices]
        else:
            r = sdk.completions.create(prompt="Order:", extra_body={"response_format": fmt}, **kw)
            texts += [(c.text, c.finish_reason) for c in r.choices]
    for text, reason in texts:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), ORDER_SCHEMA)
    assert len({t for t, _ in texts}) > 10  # sampled, not one forced answer


def test_json_object_mode_and_streaming(sdk):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=150, seed=1,
              temperature=0.7, response_format={"type": "json_object"})
    full = sdk.chat.completions.create(**kw)
    if full.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(full.choices[0].message.content), dict)
    else:  # an unconstrained object may run past max_tokens on a random model; it is still a JSON prefix
        assert full.choices[0].message.content.startswith("{")
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == full.choices[0].message.content


def test_structured_output_mixed_with_free_requests_in_one_batch(sdk):
    fmt = {"type": "json_schema", "json_schema": {"name": "o", "schema": ORDER_SCHEMA}}

    async def both():
        async with openai.AsyncOpenAI(base_url=sdk.base_url, api_key="unused", max_retries=0) as c:
            calls = [c.completions.create(model=MODEL, prompt=f"Free text {i}", max_tokens=30, seed=i,
                                          extra_body={"ignore_eos": True}) for i in range(4)]
            calls += [c.completions.create(model=MODEL, prompt=f"Order {i}", max_tokens=120, seed=i,
                                           extra_body={"response_format": fmt}) for i in range(4)]
            return await asyncio.gather(*calls)

    results = asyncio.run(both())
    assert all(r.usage.completion_tokens == 30 for r in results[:4])
    for r in results[4:]:
        json.loads(r.choices[0].text)


def test_min_tokens_with_a_schema_is_a_400(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 9, "min_tokens": 3,
                                           "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
    {"type": "json_schema"},
    {"type": "xml"},
])
def test_bad_response_format_is_a_400_naming_it(http, fmt):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 3, "response_format": fmt})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format"), r.text


@pytest.mark.parametrize("body", [{"n": 3, "prompt": "Hello there"}, {"prompt": PROMPTS}],
                         ids=["n-choices", "batched-prompts"])
def test_disconnect_mid_stream_frees_every_choice(http, live, body):
    before = live.engine.stats().kv_blocks_used
    req = {"model": MODEL, "max_tokens": 400, "temperature": 1.0, "seed": 1, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=req | body) as r:
        assert r.status_code == 200
        lines = [line for _, line in zip(range(8), r.iter_lines(), strict=False)]
        assert any(line.startswith("data: {") for line in lines)
        assert live.engine.stats().num_running >= 1
    live.wait_until(lambda: live.engine.stats().num_running + live.engine.stats().num_waiting == 0, timeout=20)
    live.wait_until(lambda: live.engine.stats().kv_blocks_used <= before, timeout=20)
