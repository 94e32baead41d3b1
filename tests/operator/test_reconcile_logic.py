"""Pure reconcile decisions: reference resolution, conditions, pruning, manual-scale detection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvfleet.operator.builders import OperatorSettings, desired_objects
from kvfleet.operator.builders.names import FIELD_MANAGER
from kvfleet.operator.children import manual_scales, stale_children
from kvfleet.operator.resolve import Unresolved, references, resolve
from kvfleet.operator.status import WorkloadState, fleet_status, status_changed, workload_state
from op_testlib import chat_fleet, colocated, inputs, objects_by_key

ROOT = Path(__file__).resolve().parents[2]


def test_references_of_a_fleet():
    refs = [(r.kind, r.name) for r in references(chat_fleet()["spec"])]
    assert refs == [("ModelVariant", "smollm2-base"), ("ModelVariant", "smollm2-support"),
                    ("CachePolicy", "int8-shared"), ("SLOClass", "interactive"), ("SLOClass", "batch")]


def test_missing_reference_is_reported_with_its_name():
    objects = objects_by_key()
    del objects[("CachePolicy", "int8-shared")]
    result = resolve(chat_fleet(), lambda k, n: objects.get((k, n)), OperatorSettings())
    assert isinstance(result, Unresolved) and result.reason == "MissingReference"
    assert "CachePolicy 'int8-shared' not found in namespace ml" in result.message


def test_invalid_reference_and_invalid_fleet():
    objects = objects_by_key()
    objects[("SLOClass", "batch")]["spec"]["ttftMs"] = -1
    result = resolve(chat_fleet(), lambda k, n: objects.get((k, n)), OperatorSettings())
    assert isinstance(result, Unresolved) and result.reason == "InvalidReference" and "ttftMs" in result.message
    bad = chat_fleet()
    bad["spec"]["topology"]["prefill"]["minReplicas"] = 9
    result = resolve(bad, lambda k, n: objects_by_key().get((k, n)), OperatorSettings())
    assert isinstance(result, Unresolved) and result.reason == "InvalidSpec"


def _deploy(name, replicas, ready, gen=1, observed=1, role="decode"):
    return {"kind": "Deployment",
            "metadata": {"name": name, "generation": gen, "labels": {"kvfleet.io/role": role}},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": ready,
                       "readyReplicas": ready}}


def test_conditions_available_progressing_degraded():
    ws = [workload_state(_deploy("d", 2, 2)), workload_state(_deploy("r", 1, 1, role="router"))]
    st = fleet_status(generation=3, previous=[], problem=None, workloads=ws, endpoint="http://x", now="T1")
    conds = {c["type"]: c for c in st["conditions"]}
    assert [conds[t]["status"] for t in ("Available", "Progressing", "Degraded")] == ["True", "False", "False"]
    assert all(c["observedGeneration"] == 3 for c in conds.values())
    assert st["roles"] == {"decode": {"desired": 2, "ready": 2}, "router": {"desired": 1, "ready": 1}}
    # re-reported later: transition times are carried over, nothing changed
    again = fleet_status(generation=3, previous=st["conditions"], problem=None, workloads=ws, endpoint="http://x",
                         now="T2")
    assert again == st and not status_changed(st, again)
    # a flip changes only the flipped condition's time
    rolling = [workload_state(_deploy("d", 3, 2)), ws[1]]
    flipped = fleet_status(generation=4, previous=st["conditions"], problem=("MissingReference", "gone"),
                           workloads=rolling, endpoint=None, now="T3")
    c = {x["type"]: x for x in flipped["conditions"]}
    assert (c["Available"]["status"], c["Available"]["lastTransitionTime"]) == ("True", "T1")
    assert (c["Progressing"]["status"], c["Progressing"]["lastTransitionTime"]) == ("True", "T3")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"], c["Degraded"]["lastTransitionTime"]) == (
        "True", "MissingReference", "T3")


def test_unavailable_when_a_role_has_no_ready_replica():
    ws = [WorkloadState("d", "decode", "v", 2, 0, False), WorkloadState("r", "router", "", 1, 1, True)]
    st = fleet_status(generation=1, previous=[], problem=None, workloads=ws, endpoint=None, now="T")
    assert st["conditions"][0]["status"] == "False" and "d" in st["conditions"][0]["message"]


def test_switch_to_colocated_prunes_prefill_and_decode():
    old = desired_objects(inputs())
    for o in old:
        o["metadata"]["uid"] = "child-" + o["metadata"]["name"]
    new = desired_objects(inputs(colocated(chat_fleet())))
    stale = sorted(o["metadata"]["name"] for o in stale_children(new, old, "uid-chat"))
    # the LoRA variant support rides on the base's pods in both topologies: only the base group's prefill and
    # decode go; its ConfigMap stays (now holding engine.json)
    assert stale == ["chat-smollm2-base-decode", "chat-smollm2-base-prefill"]
    foreign = [dict(o, metadata={**o["metadata"], "ownerReferences": []}) for o in old]
    assert stale_children(new, foreign, "uid-chat") == []  # never delete what another owner controls


def test_lora_variants_own_disaggregated_workloads_from_before_sharing_are_pruned():
    """An operator upgrade: the support variant's own prefill/decode/config (the old rule) are no longer desired."""
    desired = desired_objects(inputs())
    observed = [dict(o, metadata={**o["metadata"], "uid": "child-" + o["metadata"]["name"]}) for o in desired]
    for o in desired:
        name = o["metadata"]["name"]
        if name.startswith("chat-smollm2-base-"):
            observed.append(dict(o, metadata={**o["metadata"], "name": name.replace("-base-", "-support-"),
                                              "uid": "old-" + name}))
    stale = sorted(o["metadata"]["name"] for o in stale_children(desired, observed, "uid-chat"))
    assert stale == ["chat-smollm2-support-config", "chat-smollm2-support-decode", "chat-smollm2-support-prefill"]


def _with_manager(obj, replicas, manager):
    obj = {**obj, "spec": {**obj["spec"], "replicas": replicas}}
    obj["metadata"] = {**obj["metadata"], "managedFields": [
        {"manager": FIELD_MANAGER, "fieldsV1": {"f:spec": {"f:template": {}}}},
        {"manager": manager, "fieldsV1": {"f:spec": {"f:replicas": {}}}},
    ]}
    return obj


def test_manual_scale_is_detected_by_field_owner():
    desired = desired_objects(inputs())
    decode = next(o for o in desired if o["metadata"]["name"] == "chat-smollm2-base-decode")
    (scale,) = manual_scales(desired, [_with_manager(decode, 5, "kubectl")])
    assert (scale.name, scale.observed, scale.desired, scale.manager) == ("chat-smollm2-base-decode", 5, 2, "kubectl")
    # a difference we made ourselves (e.g. a new minReplicas) is not a manual scale
    assert manual_scales(desired, [_with_manager(decode, 1, FIELD_MANAGER)]) == []


def test_operator_modules_import_without_torch():
    modules = sorted(
        "kvfleet.operator." + ".".join(p.relative_to(ROOT / "operator").with_suffix("").parts)
        for p in (ROOT / "operator").rglob("*.py")
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    code = "import sys; sys.modules['torch'] = None\nimport importlib\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in modules) + "assert 'torch' not in [m for m in sys.modules if sys.modules[m]]\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert "kvfleet.operator.main" in modules and "kvfleet.operator.__main__" in modules


def test_object_cache_indexes_children_by_fleet_and_forgets_deleted_ones():
    from kvfleet.operator.cache import ObjectCache

    cache = ObjectCache()
    dep = {"metadata": {"name": "chat-router", "namespace": "ml", "labels": {"kvfleet.io/fleet": "chat"}}}
    cache.put("Deployment", dep)
    cache.put("ConfigMap", {"metadata": {"name": "chat-config", "namespace": "ml",
                                         "labels": {"kvfleet.io/fleet": "chat"}}})
    cache.put("ModelVariant", {"metadata": {"name": "base", "namespace": "ml"}})
    assert [(o["kind"], o["metadata"]["name"]) for o in cache.children("ml", "chat")] == [
        ("ConfigMap", "chat-config"), ("Deployment", "chat-router")]
    dep["metadata"]["name"] = "mutated"  # the cache holds a copy
    assert cache.get("Deployment", "ml", "chat-router")["metadata"]["name"] == "chat-router"
    cache.remove("Deployment", "ml", "chat-router")
    assert [o["kind"] for o in cache.children("ml", "chat")] == ["ConfigMap"]
    assert cache.children("other", "chat") == [] and cache.get("ModelVariant", "ml", "base") is not None


def test_peering_gate_follows_kopfs_rule():
    import datetime as dt

    from kvfleet.operator.peering import should_run

    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    fresh, stale = "2026-01-01T11:59:50+00:00", "2026-01-01T11:50:00+00:00"
    me = {"me": {"priority": 5, "lifetime": 60, "lastseen": fresh}}
    assert should_run(me, "me", 5, now)
    assert not should_run({**me, "other": {"priority": 10, "lifetime": 60, "lastseen": fresh}}, "me", 5, now)
    assert not should_run({**me, "twin": {"priority": 5, "lifetime": 60, "lastseen": fresh}}, "me", 5, now)
    assert should_run({**me, "low": {"priority": 1, "lifetime": 60, "lastseen": fresh}}, "me", 5, now)
    assert should_run({**me, "dead": {"priority": 10, "lifetime": 60, "lastseen": stale}}, "me", 5, now)
