"""Engine test fixtures: the project's deterministic tiny Llama (`model/tiny.py`), loaded once."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, model_config, model_dir) of a random tiny Llama in HF format (float32, CPU)."""
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_llama(str(d), seed=0)
    model, cfg = load_model(str(d), dtype=torch.float32, device="cpu")
    return model, cfg, str(d)
