"""The memory pool end to end on loopback processes: a pool, two prefill pods, a decode pod and a router,
driven by the `openai` SDK. A second request sharing a long prefix with the first, sent to the *other*
prefill pod, takes its prefix from the pool (the pods' counters) and gives a cold run's greedy tokens
(fp32); with the pool killed, requests still succeed on the direct path."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import openai
import pytest
from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.tokenizer import Tokenizer
from roles_testlib import RoleProcess, engine_config_file, role, router, start_all
from test_disaggregated import stats

SYSTEM = ("You are a careful assistant for a small library. Answer in one short sentence, cite the shelf, "
          "and never invent a book that the catalogue does not list. The catalogue follows. ") * 2
QUESTIONS = ["Where is the atlas?", "Who wrote the red book?", "Is the library open on Sunday?"]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def pool_process(tmp: Path) -> RoleProcess:
    cfg = tmp / "mempool.json"
    cfg.write_text(json.dumps({"fleet": "test", "port": 0, "replicas": 1, "capacityBytesPerReplica": 64 << 20}))
    argv = [sys.executable, "-m", "kvfleet.dataplane.roles.mempool", "--config", str(cfg), "--host", "127.0.0.1",
            "--grpc-port", "0", "--http-port", "0"]
    return RoleProcess("mempool", argv, tmp / "mempool.log", r"gRPC on (\S+:\d+)")


def cold(tiny_model_dir: Path, ids: list[int]) -> list[int]:
    eng = LLMEngine.from_config(EngineConfig(model_dir=str(tiny_model_dir), variant="tiny", block_size=4,
                                             max_num_seqs=8, max_num_batched_tokens=512,
                                             cache_policy=CachePolicyConfig()))
    return eng.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].new_token_ids


def wait_for(pred, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_the_other_prefill_pod_takes_the_prefix_from_the_pool_and_a_dead_pool_costs_nothing(tmp_path,
                                                                                             tiny_model_dir):
    tok = Tokenizer.from_dir(str(tiny_model_dir))
    cfg = engine_config_file(tmp_path, tiny_model_dir, "tiny")
    pool = pool_process(tmp_path)
    p0, p1, dec = (role(tmp_path, "prefill-a", "prefill", cfg), role(tmp_path, "prefill-b", "prefill", cfg),
                   role(tmp_path, "decode", "decode", cfg))
    start_all(pool, p0, p1, dec)
    rtr = router(tmp_path, "tiny", "tiny", tiny_model_dir,
                 [f"prefill=tiny@{p0.address}", f"prefill=tiny@{p1.address}", f"decode=tiny@{dec.address}",
                  f"mempool=@{pool.address}"], extra=["--routing", "round-robin"])
    start_all(rtr)
    try:
        client = openai.OpenAI(base_url=f"{rtr.address}/v1", api_key="unused", max_retries=0)
        prompts = [SYSTEM + q for q in QUESTIONS]
        ids = [tok.encode(p) for p in prompts]
        shared = len(tok.encode(SYSTEM)) // 4  # full blocks of the shared system prompt (about)
        assert shared >= 16
        client.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, **GREEDY)  # -> prefill-0
        wait_for(lambda: stats(p0.address, "prefill").pool_blocks_offered >= shared - 1, "the write-behind put")
        r = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=8, **GREEDY)  # -> prefill-1
        s1 = stats(p1.address, "prefill")
        assert s1.pool_blocks_fetched >= shared - 1 and s1.pool_errors == 0
        assert s1.prompt_tokens_computed <= len(ids[1]) - 4 * (shared - 1)  # the prefix was not computed again
        assert stats(p0.address, "prefill").pool_blocks_fetched == 0
        assert r.choices[0].text == tok.decode(cold(tiny_model_dir, ids[1]))
        pool.kill()  # the pool dies: requests take the direct path
        r = client.completions.create(model="tiny", prompt=prompts[2], max_tokens=8, **GREEDY)  # -> prefill-0
        assert r.choices[0].text == tok.decode(cold(tiny_model_dir, ids[2]))
        r = client.completions.create(model="tiny", prompt=SYSTEM + "Anything else?", max_tokens=8, **GREEDY)
        assert r.usage.completion_tokens == 8
        assert stats(p0.address, "prefill").pool_errors + stats(p1.address, "prefill").pool_errors >= 1
    finally:
        codes = [p.stop() for p in (rtr, p0, p1, dec)]
        pool.kill()
    assert codes == [0, 0, 0, 0], codes
