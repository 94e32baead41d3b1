"""`kvfleet serve` as a user runs it: a subprocess, a real port, the openai SDK, SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

import openai
import pytest
from process_testlib import serving_process


def kvfleet_serve(*args: str, start_timeout: float = 300) -> AbstractContextManager[str]:
    """Run `kvfleet serve ARGS --port 0`; yield its base URL; SIGTERM it and require a clean exit."""
    return serving_process([sys.executable, "-m", "kvfleet", "serve", *args, "--port", "0"], start_timeout)


def test_serve_tiny_model_and_stop_on_sigterm(tiny_dir: Path):
    with kvfleet_serve("--model", str(tiny_dir), "--served-model-name", "tiny", "other", "--max-num-seqs", "4",
                       "--kv-cache-mb", "4", "--dtype", "float32", "--threads", "1") as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny", "other"]
        r = c.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5


def test_serve_rejects_a_directory_without_a_model(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "kvfleet", "serve", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "config.json" in proc.stderr


@pytest.mark.slow
def test_serve_smollm2_answers_a_chat_request():
    from kvfleet.dataplane.model.smollm2 import SmolLM2Unavailable, smollm2_gguf

    try:
        smollm2_gguf()
    except SmolLM2Unavailable as e:
        pytest.skip(str(e))
    with kvfleet_serve("--model", "smollm2") as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=40,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert reason in ("stop", "length") and text.strip()
        assert "Paris" in text, text  # SmolLM2-135M-Instruct knows this one (greedy)
        stream = c.chat.completions.create(model="smollm2", temperature=0, max_tokens=40, stream=True,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == text
