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


def test_adapters_and_fine_tune_round_trip_and_validate_both_ways():
    from kvfleet.dataplane.config import AdapterConfig, tokenizer_dir

    cfg = _cfg(adapters=(AdapterConfig("support", "/m/support", 16, 32.0, served_name="smollm2-support", preload=True),
                         AdapterConfig("legal", "/m/legal")), adapter_memory_bytes=1 << 20, max_active_adapters=2)
    assert EngineConfig.from_json(cfg.to_json()) == cfg
    assert cfg.adapter("support").model_name == "smollm2-support" and cfg.adapter("legal").model_name == "legal"
    assert cfg.adapter("base") is None and cfg.weights_dir == "/models/m"
    ft = _cfg(fine_tune_dir="/models/ft")
    assert EngineConfig.from_json(ft.to_json()) == ft and ft.weights_dir == "/models/ft"
    assert tokenizer_dir(ft) == "/models/m"  # no tokenizer.json in the fine-tune: the base's
    for kw, needle in [
        (dict(adapters=(AdapterConfig("a", "/x"), AdapterConfig("a", "/y"))), "duplicate names"),
        (dict(adapters=(AdapterConfig("base", "/x"),)), "base variant"),
        (dict(adapters=(AdapterConfig("a", "/x"),), fine_tune_dir="/ft"), "full fine-tune"),
        (dict(adapter_memory_bytes=0), "adapter_memory_bytes"),
        (dict(max_active_adapters=0), "max_active_adapters"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            _cfg(**kw)
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        AdapterConfig("a", "/x", rank=0)
    data = cfg.to_dict()
    data["adapters"][0]["lora_dropout"] = 0.1
    with pytest.raises(ConfigError, match=r"adapters\[0\]: unknown field"):
        EngineConfig.from_dict(data)
    data = cfg.to_dict()
    data["adapters"][1]["rank"] = "16"
    with pytest.raises(ConfigError, match="rank must be int"):
        EngineConfig.from_dict(data)
