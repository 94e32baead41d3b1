"""ModelConfig parsing and the loader's errors on checkpoints that do not match their config."""

from __future__ import annotations

import json

import pytest
import torch
from kvfleet.dataplane.model.config import ModelConfig, RopeScaling
from kvfleet.dataplane.model.loader import CheckpointError, load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama
from safetensors.torch import load_file, save_file

BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 8}


def test_defaults_and_derived_fields() -> None:
    cfg = ModelConfig.from_hf_dict(BASE)
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == 8
    assert cfg.rope_scaling is None and cfg.eos_token_ids == ()
    assert cfg.kv_bytes_per_token(2) == 2 * 2 * 64 * 2


def test_eos_list_and_explicit_head_dim() -> None:
    cfg = ModelConfig.from_hf_dict({**BASE, "eos_token_id": [128001, 128009], "head_dim": 16,
                                    "num_key_value_heads": 2})
    assert cfg.eos_token_ids == (128001, 128009) and cfg.q_size == 128 and cfg.kv_size == 32


def test_from_dir_adds_generation_config_eos(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (2, 7)


def test_rope_scaling_classic_and_v5_layouts() -> None:
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    classic = ModelConfig.from_hf_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": llama3})
    v5 = ModelConfig.from_hf_dict({**BASE, "rope_parameters": {**llama3, "rope_theta": 500000.0}})
    assert classic.rope_scaling == v5.rope_scaling == RopeScaling(**{k: v for k, v in llama3.items()})
    assert classic.rope_theta == v5.rope_theta == 500000.0
    linear = ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == RopeScaling("linear", 2.0)
    assert ModelConfig.from_hf_dict({**BASE, "rope_parameters": {"rope_type": "default"}}).rope_scaling is None


@pytest.mark.parametrize("bad, match", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_rejects_unsupported(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict({**BASE, **bad})


def test_round_trip_through_hf_dict() -> None:
    cfg = ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                    "eos_token_id": [1, 2]})
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.fixture
def model_dir(tmp_path):
    return write_tiny_llama(tmp_path / "m")


def _rewrite_weights(model_dir, edit) -> None:
    tensors = load_file(str(model_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


def test_missing_tensor(model_dir) -> None:
    _rewrite_weights(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing.*up_proj"):
        load_model(model_dir)


def test_unexpected_tensor(model_dir) -> None:
    _rewrite_weights(model_dir, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected.*layers.7"):
        load_model(model_dir)


def test_shape_mismatch(model_dir) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] = 96
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatch.*gate_up_proj"):
        load_model(model_dir)


def test_missing_files(tmp_path, model_dir) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(model_dir)


def test_dtype_from_config_and_names(model_dir) -> None:
    model, _ = load_model(model_dir)  # torch_dtype float32 in config.json
    assert model.lm_head.weight.dtype == torch.float32
    model, _ = load_model(model_dir, dtype="torch.bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(model_dir, dtype="int8")
