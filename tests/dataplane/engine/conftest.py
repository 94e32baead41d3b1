"""Engine test fixtures: `tiny` prefers the project's tiny Llama (`model/tiny.py` + `loader.py`)
and falls back to a stand-in with the same forward contract."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_testlib import StandInLlama


def _real_tiny(tmp_path_factory):
    try:
        from kvfleet.dataplane.model.loader import load_model
        from kvfleet.dataplane.model.tiny import write_tiny_llama
    except ImportError:
        return None
    d = tmp_path_factory.mktemp("tiny")
    try:
        write_tiny_llama(str(d), seed=0)
        model, cfg = load_model(str(d), dtype=torch.float32, device="cpu")
    except Exception as e:  # noqa: BLE001 - the model package is being written in parallel
        import warnings

        warnings.warn(f"tiny Llama unavailable ({e!r}); using the stand-in model", stacklevel=1)
        return None
    return model, cfg, str(d)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, model_config, model_dir or None): the project's tiny Llama, else the stand-in."""
    real = _real_tiny(tmp_path_factory)
    if real is not None:
        return real
    torch.manual_seed(0)
    model = StandInLlama().eval()
    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=8, vocab_size=97,
                          max_position_embeddings=512, eos_token_ids=())
    return model, cfg, None


