"""The OpenAI surface beyond the basics, with the unmodified SDK against the real engine on the tiny
Llama: penalties and logit_bias, batched prompts and echo, n > 1, and precise 400s for bad values."""

from __future__ import annotations

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
