"""Cross-variant KV reuse from the resources to the engine config and status, by value (operator/sharing.py)."""

from __future__ import annotations

import copy
import json

import pytest
from kvfleet.dataplane.config import EngineConfig, KVShareConfig
from kvfleet.dataplane.kvsharing import ProfilePoint, SharingProfile
from kvfleet.operator.api.validate import InvalidResource, parse
from kvfleet.operator.builders import OperatorSettings, desired_objects
from kvfleet.operator.resolve import Unresolved, resolve
from kvfleet.operator.sharing import profile_refs
from op_testlib import chat_fleet, colocated, inputs, objects_by_key

SETTINGS = OperatorSettings(image="kvfleet:test")


def _objects(policy: str = "family-shared", sharing: dict | None = None, extra: dict | None = None) -> dict:
    objects = objects_by_key()
    support = objects[("ModelVariant", "smollm2-support")]
    if sharing is not None:
        support["spec"]["kvSharing"] = sharing
    objects[("InferenceFleet", "chat")]["spec"]["cachePolicy"] = policy
    objects.update(extra or {})
    return objects


def _fleet(objects: dict, topology: str = "colocated") -> dict:
    fleet = chat_fleet()
    fleet["spec"]["cachePolicy"] = objects[("InferenceFleet", "chat")]["spec"]["cachePolicy"]
    return colocated(fleet) if topology == "colocated" else fleet


def _profile(from_variant="smollm2-base", to_variant="smollm2-support", family="smollm2-135m") -> SharingProfile:
    return SharingProfile(from_variant, to_variant, family, num_layers=30, to_weights="abcd",
                          layer_scores=tuple(float(i % 7) for i in range(30)),
                          curve=(ProfilePoint((), 0.2, 0.5), ProfilePoint((0, 1), 0.03, 0.9),
                                 ProfilePoint((0, 1, 2, 3), 0.008, 0.99), ProfilePoint((0, 1, 2, 3, 4, 5, 6, 7, 8), 0.001, 1.0)))


def _profile_cm(profile: SharingProfile, name: str = "support-profile") -> dict:
    return {("ConfigMap", name): {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                                  "data": {"profile.json": profile.to_json()}}}


def _engine_config(objects: dict, topology: str = "colocated") -> EngineConfig:
    objs = {(o["kind"], o["metadata"]["name"]): o for o in desired_objects(inputs(_fleet(objects, topology), objects))}
    role = "engine.json" if topology == "colocated" else "prefill.engine.json"
    return EngineConfig.from_json(objs[("ConfigMap", "chat-smollm2-base-config")]["data"][role])


def test_manual_layers_reach_the_engines_of_the_pair_and_the_status() -> None:
    objects = _objects()  # the example's manual plan: recompute [0, 1, 2] on smollm2-base's KV
    for topology in ("colocated", "disaggregated"):
        assert _engine_config(objects, topology).kv_sharing == (
            KVShareConfig("smollm2-support", "smollm2-base", (0, 1, 2), "manual"),)
    got = inputs(_fleet(objects), objects)
    assert got.kv_sharing_status == ({"variant": "smollm2-support", "fromVariant": "smollm2-base", "inEffect": True,
                                      "recomputeLayers": [0, 1, 2], "source": "manual"},)


def test_a_policy_that_keeps_prefixes_per_variant_says_so_and_renders_nothing() -> None:
    objects = _objects(policy="int8-shared")
    assert _engine_config(objects).kv_sharing == ()
    row, = inputs(_fleet(objects), objects).kv_sharing_status
    assert row["inEffect"] is False and "prefixCache.scope" in row["reason"]


def test_auto_mode_takes_the_fewest_layers_within_the_budget_from_the_profile() -> None:
    sharing = {"mode": "auto", "fromVariant": "smollm2-base", "profile": {"configMap": "support-profile"}}
    objects = _objects(sharing=sharing, extra=_profile_cm(_profile()))
    cfg = _engine_config(objects)
    assert cfg.kv_sharing == (KVShareConfig("smollm2-support", "smollm2-base", (0, 1, 2, 3),
                                            "profile support-profile/profile.json", 30, "", "abcd"),)
    row, = inputs(_fleet(objects), objects).kv_sharing_status
    assert row["pplIncrease"] == 0.008 and row["inEffect"]
    # a tighter fraction: no plan keeps the budget, so sharing stays off and the status says why
    objects[("ModelVariant", "smollm2-support")]["spec"]["kvSharing"]["maxRecomputeFraction"] = 0.1
    assert _engine_config(objects).kv_sharing == ()
    row, = inputs(_fleet(objects), objects).kv_sharing_status
    assert not row["inEffect"] and "sharing stays off" in row["reason"] and row["pplIncrease"] == 0.03
    assert profile_refs([objects[("ModelVariant", "smollm2-support")]]) == [("ConfigMap", "support-profile")]


@pytest.mark.parametrize("problem,profile,expect", [
    ("wrong pair", _profile(from_variant="smollm2-legal"), "measures smollm2-legal -> smollm2-support"),
    ("wrong family", _profile(family="llama-8b"), "for family 'llama-8b'"),
    ("missing", None, "not found in the namespace"),
])
def test_a_profile_that_does_not_fit_refuses_the_fleet_with_the_reason(problem, profile, expect) -> None:
    sharing = {"mode": "auto", "fromVariant": "smollm2-base", "profile": {"configMap": "support-profile"}}
    objects = _objects(sharing=sharing, extra=_profile_cm(profile) if profile else {})
    got = resolve(_fleet(objects), lambda k, n: objects.get((k, n)), SETTINGS)
    assert isinstance(got, Unresolved) and got.reason == "InvalidKVSharing", problem
    assert expect in got.message and "smollm2-support" in got.message


def test_siblings_on_different_pods_or_outside_the_fleet_are_refused() -> None:
    objects = _objects()
    full = copy.deepcopy(objects[("ModelVariant", "smollm2-support")])
    full["metadata"]["name"] = "smollm2-bible"
    full["spec"]["fineTune"] = {"type": "full", "weights": {"pvc": {"claimName": "ft", "subPath": "bible"}}}
    full["spec"].pop("servedModelName")
    objects[("ModelVariant", "smollm2-bible")] = full
    fleet = _fleet(objects)
    fleet["spec"]["variants"].append({"name": "smollm2-bible"})
    got = resolve(fleet, lambda k, n: objects.get((k, n)), SETTINGS)
    assert isinstance(got, Unresolved) and "reuse across pods through the memory pool is not implemented" in got.message
    objects[("ModelVariant", "smollm2-support")]["spec"]["kvSharing"]["fromVariant"] = "smollm2-elsewhere"
    got = resolve(_fleet(objects), lambda k, n: objects.get((k, n)), SETTINGS)
    assert isinstance(got, Unresolved) and "'smollm2-elsewhere' is not a variant of this fleet" in got.message


def test_admission_rules_for_profiles_and_quantized_family_scope() -> None:
    variant = objects_by_key()[("ModelVariant", "smollm2-support")]
    variant["metadata"]["namespace"] = "ml"
    bad = copy.deepcopy(variant)
    bad["spec"]["kvSharing"] = {"mode": "auto", "fromVariant": "smollm2-base"}
    with pytest.raises(InvalidResource, match="mode auto needs profile"):
        parse(bad)
    bad["spec"]["kvSharing"] = {"mode": "manual", "fromVariant": "smollm2-base", "recomputeLayers": [1],
                                "profile": {"configMap": "p"}}
    with pytest.raises(InvalidResource, match="profile applies only to mode auto"):
        parse(bad)
    policy = copy.deepcopy(objects_by_key()[("CachePolicy", "family-shared")])
    policy["metadata"]["namespace"] = "ml"
    parse(policy)
    policy["spec"]["quantization"] = {"dtype": "int8"}
    with pytest.raises(InvalidResource, match="family-scope prefix sharing needs unquantized KV"):
        parse(policy)
    assert json.loads(_profile().to_json())["kind"] == "KVSharingProfile"
