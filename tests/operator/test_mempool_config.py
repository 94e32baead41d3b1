"""The mempool.json the operator renders is what the mempool role reads (one shape, checked at both ends)."""

from __future__ import annotations

import copy
import json

import pytest
from kvfleet.dataplane.config import ConfigError
from kvfleet.dataplane.pool_config import PoolConfig
from kvfleet.dataplane.roles.mempool_store import store_for
from kvfleet.operator.builders.config import MEMPOOL_JSON, fleet_config_data
from op_testlib import inputs, objects_by_key


def test_the_rendered_mempool_json_is_read_by_the_pool_with_the_pinned_classes():
    data = json.loads(fleet_config_data(inputs())[MEMPOOL_JSON])
    cfg = PoolConfig.from_dict(data)
    store = store_for(cfg)
    assert store.capacity_bytes == data["capacityBytesPerReplica"] > 0
    assert store.high_watermark == data["highWatermark"]
    assert store.pin_caps == {"interactive": 268435456}  # examples/02-sloclasses.yaml; batch does not pin
    assert cfg.port == 50052


def test_a_class_without_pinning_is_not_rendered():
    objects = objects_by_key()
    slo = copy.deepcopy(objects[("SLOClass", "interactive")])
    slo["spec"]["kvPinning"] = {"enabled": False, "maxPinnedBytes": 0}
    objects[("SLOClass", "interactive")] = slo
    data = json.loads(fleet_config_data(inputs(objects=objects))[MEMPOOL_JSON])
    assert data["pinning"] == {}


def test_pins_that_cannot_fit_in_the_pool_fail_the_build_with_the_reason():
    objects = objects_by_key()
    policy = copy.deepcopy(objects[("CachePolicy", "int8-shared")])
    policy["spec"]["pool"]["capacityBytes"] = 256 << 20  # half of 0.9 x 256 MiB < the 256 MiB interactive pins
    objects[("CachePolicy", "int8-shared")] = policy
    with pytest.raises(ConfigError, match="maxPinnedBytes"):
        fleet_config_data(inputs(objects=objects))
