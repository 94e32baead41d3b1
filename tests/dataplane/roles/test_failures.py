"""Failure behaviour of the disaggregated path, each with real processes on loopback.

- a corrupted block in transit: the checksum catches it, decode recomputes, the output is unchanged;
- a decode pod killed: the next request goes to the surviving decode pod (the dead one refuses at
  Reserve), a stream cut after tokens were sent ends with a clean error, never wrong tokens;
- no KV room anywhere: a sheddable class gets 429 + Retry-After, nothing leaks.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from roles_testlib import engine_config_file, role, router, start_all
from test_disaggregated import GREEDY, stats

PROMPT = "The quick brown fox jumps over the lazy dog and keeps running far away."


def _client(rtr) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{rtr.address}/v1", api_key="unused", max_retries=0)


def _text(rtr, n: int = 10) -> str:
    return _client(rtr).completions.create(model="tiny", prompt=PROMPT, max_tokens=n, **GREEDY).choices[0].text


@pytest.fixture
def clean_ref(tmp_path, tiny_model_dir):
    """The greedy text of PROMPT through a healthy prefill + decode pair."""
    cfg = engine_config_file(tmp_path, tiny_model_dir, "tiny")
    pre, dec = role(tmp_path, "ref-prefill", "prefill", cfg), role(tmp_path, "ref-decode", "decode", cfg)
    start_all(pre, dec)
    rtr = router(tmp_path, "tiny", "tiny", tiny_model_dir, [f"prefill=tiny@{pre.address}", f"decode=tiny@{dec.address}"])
    start_all(rtr)
    try:
        return {n: _text(rtr, n) for n in (10, 40)}
    finally:
        for p in (rtr, pre, dec):
            p.stop()


def test_corrupted_block_is_recomputed_with_the_same_output(tmp_path, tiny_model_dir, clean_ref):
    cfg = engine_config_file(tmp_path, tiny_model_dir, "tiny")
    pre = role(tmp_path, "prefill", "prefill", cfg, env={"KVFLEET_TEST_CORRUPT_KV": "1"})
    dec = role(tmp_path, "decode", "decode", cfg)
    start_all(pre, dec)
    rtr = router(tmp_path, "tiny", "tiny", tiny_model_dir, [f"prefill=tiny@{pre.address}", f"decode=tiny@{dec.address}"])
    start_all(rtr)
    try:
        assert _text(rtr) == clean_ref[10]
        d = stats(dec.address, "decode")
        assert d.kv_checksum_failures == 1 and d.recomputes == 1
        assert d.kv_blocks_used == 0 and d.reservations == 0
    finally:
        for p in (rtr, pre, dec):
            p.stop()


def test_decode_pod_killed(tmp_path, tiny_model_dir, clean_ref):
    cfg = engine_config_file(tmp_path, tiny_model_dir, "tiny")
    pre = role(tmp_path, "prefill", "prefill", cfg)
    d1, d2 = role(tmp_path, "decode-1", "decode", cfg), role(tmp_path, "decode-2", "decode", cfg)
    start_all(pre, d1, d2)
    rtr = router(tmp_path, "tiny", "tiny", tiny_model_dir,
                 [f"prefill=tiny@{pre.address}", f"decode=tiny@{d1.address}", f"decode=tiny@{d2.address}"])
    start_all(rtr)
    try:
        assert _text(rtr) == clean_ref[10]
        # a stream cut mid-way: kill the decode pod serving a long request once tokens flow
        got: list[str] = []
        errors: list[BaseException] = []

        def long_stream() -> None:
            try:
                for c in _client(rtr).completions.create(model="tiny", prompt=PROMPT, max_tokens=400, stream=True,
                                                         **GREEDY):
                    got.append(c.choices[0].text if c.choices else "")
            except BaseException as e:  # noqa: BLE001 - what the client sees is the assertion
                errors.append(e)

        t = threading.Thread(target=long_stream)
        t.start()
        deadline = time.monotonic() + 60
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = max((d1, d2), key=lambda d: stats(d.address, "decode").num_running)
        victim.kill()
        t.join(timeout=60)
        survivor = d2 if victim is d1 else d1
        text = "".join(got)
        assert text[:len(clean_ref[40])] == clean_ref[40][:len(text)]  # what arrived was the right text
        assert errors or len(got) < 400  # the stream ended early: an error, never made-up tokens
        # requests keep working: the dead pod refuses at Reserve, the survivor serves
        for _ in range(3):
            assert _text(rtr) == clean_ref[10]
        s = stats(survivor.address, "decode")
        assert s.kv_blocks_used == 0 and s.reservations == 0
        assert stats(pre.address, "prefill").kv_blocks_used == 0  # prefill freed its blocks after the push
    finally:
        for p in (rtr, pre, d1, d2):
            p.kill() if p in (d1, d2) else p.stop()


def test_no_room_sheds_sheddable_with_retry_after(tmp_path, tiny_model_dir):
    cfg = engine_config_file(tmp_path, tiny_model_dir, "tiny")
    one_seat = engine_config_file(tmp_path, tiny_model_dir, "tiny", max_num_seqs=1)
    pre, dec = role(tmp_path, "prefill", "prefill", cfg), role(tmp_path, "decode", "decode", one_seat)
    start_all(pre, dec)
    rtr = router(tmp_path, "tiny", "tiny", tiny_model_dir, [f"prefill=tiny@{pre.address}", f"decode=tiny@{dec.address}"],
                 sheddable=("batch",), extra=["--queue-timeout", "1"])
    start_all(rtr)
    try:
        first: list[str] = []
        holder = threading.Thread(target=lambda: first.append(_text(rtr, 300)))
        holder.start()  # holds the decode pod's only seat for a while
        deadline = time.monotonic() + 30
        while stats(dec.address, "decode").num_running + stats(dec.address, "decode").reservations == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0}
        r = httpx.post(f"{rtr.address}/v1/completions", json=body, headers={"x-kvfleet-slo-class": "batch"}, timeout=30)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and "KV room" in r.json()["error"]["message"]
        holder.join(timeout=120)
        assert first and len(first[0]) > 0
        # with the seat free again, both classes are served
        for klass in ("batch", "interactive"):
            r = httpx.post(f"{rtr.address}/v1/completions", json=body, headers={"x-kvfleet-slo-class": klass},
                           timeout=30)
            assert r.status_code == 200, r.text
        s = stats(dec.address, "decode")
        assert s.kv_blocks_used == 0 and s.reservations == 0
    finally:
        for p in (rtr, pre, dec):
            p.stop()
