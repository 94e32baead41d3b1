"""Router, prefill and decode as separate processes on loopback, driven by the unmodified `openai` SDK.

The same greedy tokens as a colocated engine (fp32 and an int8 KIVI CachePolicy with lanes), streamed
and not, with usage; the KV really crossed (decode's counters) and nothing leaked afterwards.
"""

from __future__ import annotations

import time

import grpc
import openai
import pytest
from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.tokenizer import Tokenizer
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc
from roles_testlib import engine_config_file, role, router, start_all

INT8 = CachePolicyConfig(key_quantization="int8", value_quantization="int8", key_granularity="per-channel",
                         group_size=2, residual_tokens=3, quant_sink_tokens=2)
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12",
           "A short one"]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def stats(address: str, role_name: str) -> pb.RoleStats:
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.DecodeStub(ch) if role_name == "decode" else pb_grpc.PrefillStub(ch)
        return stub.Stats(pb.Empty(), timeout=5)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def fleet(request, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp(f"disagg-{request.param}")
    cp = INT8 if request.param == "int8" else None
    cfg = engine_config_file(tmp, tiny_model_dir, "tiny", cp)
    pre, dec = role(tmp, "prefill", "prefill", cfg), role(tmp, "decode", "decode", cfg)
    start_all(pre, dec)
    rtr = router(tmp, "tiny", "tiny", tiny_model_dir, [f"prefill=tiny@{pre.address}", f"decode=tiny@{dec.address}"])
    start_all(rtr)
    yield {"cp": cp or CachePolicyConfig(), "prefill": pre, "decode": dec, "router": rtr}
    codes = [p.stop() for p in (rtr, pre, dec)]
    assert codes == [0, 0, 0], codes


def colocated_greedy(tiny_model_dir, cp: CachePolicyConfig, prompts: list[list[int]], n: int) -> list[list[int]]:
    """One colocated engine serving the prompts one after another, as the router is asked them (so its
    prefix cache sees the same history: under int8, a repeated prompt reads its cached rows as stored)."""
    eng = LLMEngine.from_config(EngineConfig(model_dir=str(tiny_model_dir), variant="tiny", block_size=4,
                                             max_num_seqs=8, max_num_batched_tokens=512, cache_policy=cp))
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [eng.generate([p], sp)[0].new_token_ids for p in prompts]


def test_openai_sdk_gets_the_colocated_tokens(fleet, tiny_model_dir):
    tok = Tokenizer.from_dir(str(tiny_model_dir))
    client = openai.OpenAI(base_url=f"{fleet['router'].address}/v1", api_key="unused", max_retries=0)
    ids = [tok.encode(p) for p in PROMPTS]
    want = colocated_greedy(tiny_model_dir, fleet["cp"], [i for i in ids for _ in (0, 1)], 12)  # each prompt twice
    for k, p in enumerate(PROMPTS):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=12, logprobs=0, **GREEDY)
        assert r.usage.prompt_tokens == len(ids[k]) and r.usage.completion_tokens == 12
        assert r.choices[0].text == tok.decode(want[2 * k]) and len(r.choices[0].logprobs.tokens) == 12
        chunks = list(client.completions.create(model="tiny", prompt=p, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == tok.decode(want[2 * k + 1])
        assert chunks[-1].usage.completion_tokens == 12
    d = stats(fleet["decode"].address, "decode")
    assert d.kv_blocks_received > 0 and d.recomputes == 0 and d.kv_checksum_failures == 0
    assert stats(fleet["prefill"].address, "prefill").kv_bytes_sent == d.kv_bytes_received
    assert d.kv_blocks_used == 0 and d.reservations == 0  # everything freed


def test_chat_stream_and_first_token_only(fleet):
    client = openai.OpenAI(base_url=f"{fleet['router'].address}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=9, **GREEDY)
    streamed = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=9, stream=True, **GREEDY))
    assert streamed[0].choices[0].delta.role == "assistant" and full.usage.completion_tokens == 9
    if fleet["cp"].key_quantization == "none":  # int8: the repeat reads its cached prefix as stored (documented)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == full.choices[0].message.content
    one = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, **GREEDY)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    # a 1-token request releases its room (the router does it as the response ends: allow it a moment)
    deadline = time.monotonic() + 10
    while stats(fleet["decode"].address, "decode").reservations:
        assert time.monotonic() < deadline, "the reservation of a 1-token request was never released"
        time.sleep(0.05)


@pytest.mark.parametrize("fleet", ["fp32"], indirect=True)  # one policy is enough for the sampling surface
def test_penalties_cross_the_hand_off_and_what_cannot_is_refused(fleet, tiny_model_dir):
    """Penalties and biases travel to decode (same tokens as colocated); n > 1 and grammars get a 400."""
    tok = Tokenizer.from_dir(str(tiny_model_dir))
    client = openai.OpenAI(base_url=f"{fleet['router'].address}/v1", api_key="unused", max_retries=0)
    prompt = "Penalties: one two three four"
    ids = tok.encode(prompt)
    eng = LLMEngine.from_config(EngineConfig(model_dir=str(tiny_model_dir), variant="tiny", block_size=4,
                                             max_num_seqs=8, max_num_batched_tokens=512))
    banned = eng.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0].new_token_ids[0]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, frequency_penalty=1.5,
                        presence_penalty=0.5, repetition_penalty=1.3, logit_bias=((banned, -100.0),))
    want = eng.generate([ids], sp)[0].new_token_ids
    assert banned not in want
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0.0, frequency_penalty=1.5,
                                  presence_penalty=0.5, logit_bias={str(banned): -100},
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.3})
    assert r.choices[0].text == tok.decode(want)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_object"})
    assert e.value.body["param"] == "response_format"
    assert stats(fleet["decode"].address, "decode").reservations == 0
