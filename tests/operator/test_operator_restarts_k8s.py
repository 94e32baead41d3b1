"""SIGKILL the operator in the middle of reconciles, five times: the end state is the one it should be."""

from __future__ import annotations

import json
import time

import pytest
from k8s_testlib import apply_doc, children, condition, fleet_manifest, wait_for
from kvfleet.operator.builders import FleetInputs, OperatorSettings, desired_objects
from kvfleet.operator.builders.names import ANNOTATION_CONFIG_HASH
from kvfleet.operator.resolve import resolve

pytestmark = pytest.mark.k8s


def expected(env):
    """What an uninterrupted operator converges to: the pure builders over the objects now in the API."""
    f = env.kube.get("InferenceFleet", env.namespace, "chat")
    inputs = resolve(f, lambda k, n: env.kube.get(k, env.namespace, n), OperatorSettings())
    assert isinstance(inputs, FleetInputs)
    return {(o["kind"], o["metadata"]["name"]): o for o in desired_objects(inputs)}


def summary(obj):
    spec = obj.get("spec") or {}
    tmpl = (spec.get("template") or {}).get("metadata") or {}
    return (spec.get("replicas"), (tmpl.get("annotations") or {}).get(ANNOTATION_CONFIG_HASH), obj.get("data"))


def test_sigkill_mid_reconcile_five_times_converges_without_duplicates_or_orphans(operator_env):
    env = operator_env
    ns, kubectl = env.namespace, env.cluster.kubectl
    fleet = fleet_manifest()
    # the builders' output is what must converge here; with autoscaling on, a fleet without traffic keeps
    # the replicas it has when minReplicas drops (the planner never scales without data: test_planner,
    # test_autoscaling_k8s), which would make the expected state depend on the kill points
    fleet["spec"]["autoscaling"]["enabled"] = False
    apply_doc(env.cluster, ns, fleet)
    for i, delay in enumerate((0.3, 0.8, 0.05, 1.2, 0.5)):
        env.operator.wait_ready()
        # every round changes the spec or a reference, so the killed operator had work in flight
        kubectl("patch", "fleet", "chat", "-n", ns, "--type=merge", "-p", json.dumps(
            {"spec": {"topology": {"decode": {"minReplicas": 1 + i % 3}, "prefill": {"maxNumBatchedTokens": 1024 * (i + 1)}}}}))
        if i % 2:
            kubectl("patch", "cachepolicy", "int8-shared", "-n", ns, "--type=merge",
                    "-p", json.dumps({"spec": {"blockSizeTokens": 16 if i % 4 == 1 else 32}}))
        time.sleep(delay)
        env.operator.kill()  # SIGKILL: no cleanup, no graceful stop
        env.operator.start()
    f = wait_for("the fleet to settle after the last restart", lambda: (lambda f: f if (
        condition(f, "Available").get("status") == "True" and condition(f, "Progressing").get("status") == "False"
        and f["status"].get("observedGeneration") == f["metadata"]["generation"]) else None)(
        env.kube.get("InferenceFleet", ns, "chat")), timeout=180)
    assert env.operator.starts == 6 and env.operator.alive()

    want = expected(env)
    have = children(env.kube, ns, "chat")
    assert set(have) == set(want), "no orphans and nothing missing"
    for key, obj in want.items():
        assert summary(have[key]) == summary(obj), key
    uid = f["metadata"]["uid"]
    for obj in have.values():
        refs = obj["metadata"]["ownerReferences"]
        assert [r["uid"] for r in refs if r.get("controller")] == [uid]
    # no duplicate workloads: per Deployment exactly one ReplicaSet with replicas, and pods match the spec
    rs = env.cluster.apps.list_namespaced_replica_set(ns, label_selector="kvfleet.io/fleet=chat").items
    active = [r for r in rs if (r.spec.replicas or 0) > 0]
    deployments = [k[1] for k in want if k[0] == "Deployment"]
    assert sorted(r.metadata.owner_references[0].name for r in active) == sorted(deployments)
    pods = [p for p in env.cluster.core.list_namespaced_pod(ns, label_selector="kvfleet.io/fleet=chat").items
            if p.metadata.deletion_timestamp is None]
    assert len(pods) == sum(o["spec"]["replicas"] for o in want.values() if o["kind"] in ("Deployment", "StatefulSet"))
    # kopf's progress lives in annotations; nothing of kopf leaked into status
    assert set(f["status"]) <= {"observedGeneration", "conditions", "roles", "routerEndpoint", "sloClasses", "adapters",
                                "kvSharing"}
    # status.adapters (not kopf's): the LoRA variant is served by the base group's prefill and decode
    assert f["status"]["adapters"] == [
        {"workload": f"chat-smollm2-base-{role}", "variant": "smollm2-base", "adapters": ["smollm2-support"]}
        for role in ("decode", "prefill")]
