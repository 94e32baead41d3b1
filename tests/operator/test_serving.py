"""Serving groups by value: LoRA variants share their base's pods, full fine-tunes get their own, and a
variant whose weights cannot be served is refused with a reason."""

from __future__ import annotations

import copy
import json

from kvfleet.dataplane.config import AdapterConfig, EngineConfig
from kvfleet.operator.builders import OperatorSettings, desired_objects
from kvfleet.operator.resolve import Unresolved, resolve
from kvfleet.operator.status import fleet_status, workload_state
from op_testlib import chat_fleet, colocated, inputs, objects_by_key


def _lora(name: str, sub_path: str, rank: int | None = 16, alpha: float | None = 32.0) -> dict:
    ft = {"type": "lora", "weights": {"pvc": {"claimName": "adapters", "subPath": sub_path}}}
    if rank is not None:
        ft |= {"loraRank": rank, "loraAlpha": alpha}
    return {"apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": name},
            "spec": {"family": "smollm2-135m", "base": {"builtin": "smollm2-135m-instruct"}, "fineTune": ft}}


def _full(name: str) -> dict:
    return {"apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": name},
            "spec": {"family": "smollm2-135m", "base": {"builtin": "smollm2-135m-instruct"}, "maxModelLen": 2048,
                     "fineTune": {"type": "full", "weights": {"pvc": {"claimName": "ft", "subPath": "bible"}}}}}


def _fleet(*extra: dict, topology: str = "colocated"):
    objects = objects_by_key()
    for v in extra:
        objects[("ModelVariant", v["metadata"]["name"])] = v
    fleet = chat_fleet()
    fleet["spec"]["variants"] += [{"name": v["metadata"]["name"]} for v in extra]
    return (colocated(fleet) if topology == "colocated" else fleet), objects


def by_name(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_base_and_two_lora_variants_share_one_set_of_workloads():
    fleet, objects = _fleet(_lora("smollm2-legal", "legal-v1", rank=None))  # rank/alpha read from the adapter
    objs = by_name(desired_objects(inputs(fleet, objects)))
    assert sorted(n for k, n in objs if k == "Deployment") == ["chat-router", "chat-smollm2-base-engine"]
    assert sorted(n for k, n in objs if k == "ConfigMap") == ["chat-config", "chat-smollm2-base-config"]
    data = objs[("ConfigMap", "chat-smollm2-base-config")]["data"]
    cfg = EngineConfig.from_json(data["engine.json"])
    assert cfg.variant == "smollm2-base" and cfg.fine_tune_dir is None
    assert cfg.adapters == (
        AdapterConfig("smollm2-support", "/models/smollm2-support/finetune", 16, 32.0, served_name="smollm2-support"),
        AdapterConfig("smollm2-legal", "/models/smollm2-legal/finetune", None, None, served_name="smollm2-legal"))
    variant = json.loads(data["variant.json"])
    assert variant["servedModelName"] == "smollm2" and variant["adapters"] == ["smollm2-support", "smollm2-legal"]
    engine = objs[("Deployment", "chat-smollm2-base-engine")]
    assert engine["metadata"]["annotations"] == {"kvfleet.io/adapters": "smollm2-support,smollm2-legal"}
    pod = engine["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: (m["name"], m.get("subPath")) for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/models/smollm2-support/finetune"] == ("adapter-0", "support-v3")
    assert mounts["/models/smollm2-legal/finetune"] == ("adapter-1", "legal-v1")
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} \
        == {"adapter-0": "adapters", "adapter-1": "adapters"}
    router = json.loads(objs[("ConfigMap", "chat-config")]["data"]["router.json"])
    assert [(m["model"], m["servedBy"], m["parent"]) for m in router["models"]] == [
        ("smollm2", "smollm2-base", None), ("smollm2-support", "smollm2-base", "smollm2"),
        ("smollm2-legal", "smollm2-base", "smollm2")]


def test_full_fine_tune_gets_its_own_workload_with_its_weights():
    fleet, objects = _fleet(_full("smollm2-bible"))
    objs = by_name(desired_objects(inputs(fleet, objects)))
    assert sorted(n for k, n in objs if k == "Deployment") == [
        "chat-router", "chat-smollm2-base-engine", "chat-smollm2-bible-engine"]
    cfg = EngineConfig.from_json(objs[("ConfigMap", "chat-smollm2-bible-config")]["data"]["engine.json"])
    assert cfg.variant == "smollm2-bible" and cfg.adapters == ()
    assert cfg.fine_tune_dir == "/models/smollm2-bible/finetune"
    assert cfg.model_dir == "/var/cache/kvfleet/models/smollm2-135m-instruct"  # the base's tokenizer, if needed
    assert "annotations" not in objs[("Deployment", "chat-smollm2-bible-engine")]["metadata"]


def test_lora_variants_without_their_base_in_the_fleet_form_an_adapters_only_group():
    fleet, objects = _fleet(_lora("smollm2-legal", "legal-v1"))
    fleet["spec"]["variants"] = [v for v in fleet["spec"]["variants"] if v["name"] != "smollm2-base"]
    objs = by_name(desired_objects(inputs(fleet, objects)))
    assert sorted(n for k, n in objs if k == "Deployment") == ["chat-router", "chat-smollm2-support-engine"]
    data = objs[("ConfigMap", "chat-smollm2-support-config")]["data"]
    cfg = EngineConfig.from_json(data["engine.json"])
    assert cfg.variant == "" and [a.name for a in cfg.adapters] == ["smollm2-support", "smollm2-legal"]
    assert json.loads(data["variant.json"])["servedModelName"] is None  # the base is not served


def test_disaggregated_lora_variant_rides_on_its_base_prefill_and_decode_pods():
    objs = by_name(desired_objects(inputs()))  # the example: disaggregated, base + LoRA support
    assert ("Deployment", "chat-smollm2-support-decode") not in objs
    for role in ("prefill", "decode"):
        assert ("Deployment", f"chat-smollm2-base-{role}") in objs
        cfg = EngineConfig.from_json(objs[("ConfigMap", "chat-smollm2-base-config")]["data"][f"{role}.engine.json"])
        assert [a.name for a in cfg.adapters] == ["smollm2-support"]
    router = json.loads(objs[("ConfigMap", "chat-config")]["data"]["router.json"])
    support = next(m for m in router["models"] if m["variant"] == "smollm2-support")
    assert support["servedBy"] == "smollm2-base" and support["parent"] == "smollm2"


def test_unservable_variants_are_refused_with_a_reason():
    bad = _lora("smollm2-oops", "x")
    bad["spec"]["fineTune"]["weights"] = {"builtin": "tiny-llama"}
    wrong_arch = _full("smollm2-tiny")
    wrong_arch["spec"]["fineTune"]["weights"] = {"builtin": "tiny-llama"}
    for variant, words in ((bad, "not a PEFT LoRA adapter"), (wrong_arch, "must have its base's architecture")):
        fleet, objects = _fleet(variant)
        got = resolve(fleet, lambda k, n, o=objects: o.get((k, n)), OperatorSettings())
        assert isinstance(got, Unresolved) and got.reason == "UnservableVariant", got
        assert variant["metadata"]["name"] in got.message and words in got.message


def test_status_lists_the_adapters_each_workload_serves():
    fleet, objects = _fleet(_lora("smollm2-legal", "legal-v1"))
    deployments = [copy.deepcopy(o) for o in desired_objects(inputs(fleet, objects)) if o["kind"] == "Deployment"]
    status = fleet_status(generation=1, previous=[], problem=None, now="2026-01-01T00:00:00Z",
                          workloads=[workload_state(d) for d in deployments], endpoint=None)
    assert status["adapters"] == [{"workload": "chat-smollm2-base-engine", "variant": "smollm2-base",
                                   "adapters": ["smollm2-support", "smollm2-legal"]}]


def test_preload_reaches_the_adapter_config_and_is_refused_on_a_variant_with_its_own_weights():
    fleet, objects = _fleet(_lora("smollm2-legal", "legal-v1"))
    for ref in fleet["spec"]["variants"]:
        ref["preload"] = ref["name"] == "smollm2-legal"
    objs = by_name(desired_objects(inputs(fleet, objects)))
    cfg = EngineConfig.from_json(objs[("ConfigMap", "chat-smollm2-base-config")]["data"]["engine.json"])
    assert {a.name: a.preload for a in cfg.adapters} == {"smollm2-support": False, "smollm2-legal": True}
    fleet["spec"]["variants"][0]["preload"] = True  # smollm2-base: its own weights
    got = resolve(fleet, lambda k, n, o=objects: o.get((k, n)), OperatorSettings())
    assert isinstance(got, Unresolved) and got.reason == "UnservableVariant"
    assert "variants[0].preload" in got.message and "smollm2-base" in got.message
