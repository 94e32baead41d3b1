"""The colocated engine role as a pod runs it: an operator-rendered config directory, a real port."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.roles.engine import resolve_model_dir
from process_testlib import serving_process


def _config_dir(tmp_path: Path, model_dir: str, variant: dict) -> Path:
    config_dir = tmp_path / "etc-kvfleet"
    config_dir.mkdir()
    config = EngineConfig(model_dir=model_dir, variant="tiny-chat", dtype="float32", max_num_seqs=4,
                          kv_cache_bytes=4 * 2**20)
    (config_dir / "engine.json").write_text(config.to_json())
    (config_dir / "variant.json").write_text(json.dumps(variant))
    return config_dir


def test_engine_role_materialises_a_builtin_model_and_serves_it(tmp_path: Path):
    variant = {"name": "tiny-chat", "servedModelName": "tiny", "spec": {"base": {"builtin": "tiny-llama"}}}
    # As rendered for a pod: the builtin's path inside the image does not exist on this machine.
    config_dir = _config_dir(tmp_path, "/var/cache/kvfleet/models/tiny-llama", variant)
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "kvfleet.dataplane.roles.engine", "--config", str(config_dir / "engine.json"),
            "--host", "127.0.0.1", "--port", "0", "--threads", "1"]
    with serving_process(argv, env={"KVFLEET_CACHE": str(cache)}) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 4
    assert (cache / "models" / "tiny-llama-seed0" / "config.json").is_file()


def test_configured_model_dir_wins_over_the_builtin(tiny_model_dir: Path):
    assert resolve_model_dir(str(tiny_model_dir), {"spec": {"base": {"builtin": "tiny-llama"}}}) == tiny_model_dir


def test_missing_weights_without_a_builtin_is_a_clear_error(tmp_path: Path):
    import pytest

    with pytest.raises(SystemExit, match="no config.json"):
        resolve_model_dir(str(tmp_path / "nothing"), {"spec": {"base": {"hostPath": "/models/x"}}})


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tmp_path: Path, tiny_model_dir: Path):
    """A scale-down never cuts a request: on SIGTERM the pod fails /health, answers new requests 503, lets
    the stream in flight finish, then exits cleanly (KVFLEET_DRAIN_SECONDS, rendered from drainSeconds)."""
    import os
    import signal
    import subprocess
    import threading
    import time

    import httpx

    variant = {"name": "tiny-chat", "servedModelName": "tiny", "spec": {"base": {"builtin": "tiny-llama"}}}
    config_dir = _config_dir(tmp_path, str(tiny_model_dir), variant)
    log = tmp_path / "engine.log"
    proc = subprocess.Popen([sys.executable, "-m", "kvfleet.dataplane.roles.engine", "--config",
                             str(config_dir / "engine.json"), "--host", "127.0.0.1", "--port", "0", "--threads", "1"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "KVFLEET_DRAIN_SECONDS": "60"})
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = log.read_text().split("listening on ")[1].split()[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        longest = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"] - 8
        pieces: list[str] = []
        done: list[str] = []

        def stream() -> None:  # as long as the model allows, so it is still running when SIGTERM lands
            for c in client.completions.create(model="tiny", prompt="Hello", max_tokens=longest, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}):
                pieces.append(c.choices[0].text)
                if c.choices[0].finish_reason:
                    done.append(c.choices[0].finish_reason)

        t = threading.Thread(target=stream)
        t.start()
        while len(pieces) < 5:
            assert t.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=5).status_code != 503:  # out of the Service's endpoints
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        t.join(timeout=120)
        assert done == ["length"]  # the request in flight was not cut
        assert proc.wait(timeout=60) == 0
        assert "drained" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
