"""EngineConfig: JSON round trip, validation with clear errors, torch-free import."""

import subprocess
import sys

import pytest
from kvfleet.dataplane.config import CachePolicyConfig, ConfigError, EngineConfig, SLOClassConfig


def _cfg(**kw):
    base = dict(
        model_dir="/models/m",
        variant="base",
        num_kv_blocks=128,
        slo_classes=(SLOClassConfig("chat", 300, 40, priority=2), SLOClassConfig("batch", 5000, 500, sheddable=True)),
        default_slo_class="batch",
    )
    base.update(kw)
    return EngineConfig(**base)


def test_json_round_trip():
    cfg = _cfg()
    text = cfg.to_json()
    assert EngineConfig.from_json(text) == cfg
    assert EngineConfig.from_json(EngineConfig(model_dir="x").to_json()) == EngineConfig(model_dir="x")


def test_slo_class_lookup_falls_back_to_default():
    cfg = _cfg()
    assert cfg.slo_class("chat").priority == 2
    assert cfg.slo_class("nope").name == "batch"
    assert cfg.slo_class(None).name == "batch"
    assert EngineConfig(model_dir="x").slo_class("chat") is None


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(block_size=12), "block_size"),
        (dict(kv_cache_bytes=1 << 20), "not both"),
        (dict(dtype="fp64"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(default_slo_class="gold"), "default_slo_class"),
        (dict(slo_classes=(SLOClassConfig("a", 1, 1), SLOClassConfig("a", 2, 2))), "duplicate"),
    ],
)
def test_validation_names_the_field(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(**kw)


def test_from_json_errors():
    with pytest.raises(ConfigError, match="not valid JSON"):
        EngineConfig.from_json("{")
    with pytest.raises(ConfigError, match="unknown field"):
        EngineConfig.from_dict({"model_dir": "m", "blocksize": 16})
    with pytest.raises(ConfigError, match="block_size must be int"):
        EngineConfig.from_dict({"model_dir": "m", "block_size": "16"})
    with pytest.raises(ConfigError, match=r"slo_classes\[0\]: unknown"):
        EngineConfig.from_dict({"model_dir": "m", "slo_classes": [{"name": "a", "ttft_ms": 1, "tpot_ms": 1, "x": 1}]})
    with pytest.raises(ConfigError, match="ttft_ms must be > 0"):
        EngineConfig.from_dict({"model_dir": "m", "slo_classes": [{"name": "a", "ttft_ms": 0, "tpot_ms": 1}]})
    with pytest.raises(ConfigError, match="eviction"):
        CachePolicyConfig(eviction="h2o-typo")
    with pytest.raises(ConfigError, match="must not be null"):
        EngineConfig.from_dict({"model_dir": "m", "block_size": None})


def test_config_is_torch_free():
    code = "import sys, kvfleet.dataplane.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
