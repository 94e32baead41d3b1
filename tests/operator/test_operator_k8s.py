"""The operator against the real control plane: create, roll, converge, degrade, delete.

Each test runs `python -m kvfleet.operator -n <its namespace>` as a subprocess
against the session's kube-apiserver (KWOK GPU nodes, real controllers and GC).
"""

from __future__ import annotations

import json

import pytest
from k8s_testlib import apply_doc, children, condition, fleet_manifest, wait_for
from kvfleet.dataplane.config import EngineConfig
from kvfleet.operator.sharing import OFF_BY_POLICY

pytestmark = pytest.mark.k8s

# the LoRA variant smollm2-support rides on smollm2-base's prefill/decode pods: one set of workloads
DISAGGREGATED = {
    ("ConfigMap", "chat-config"), ("ConfigMap", "chat-smollm2-base-config"),
    ("Deployment", "chat-smollm2-base-prefill"), ("Deployment", "chat-smollm2-base-decode"),
    ("StatefulSet", "chat-mempool"), ("Service", "chat-mempool"),
    ("Deployment", "chat-router"), ("Service", "chat-router"),
    ("ServiceAccount", "chat-router"), ("Role", "chat-router"), ("RoleBinding", "chat-router"),
}


def fleet(env, name="chat"):
    return env.kube.get("InferenceFleet", env.namespace, name)


def available(env, name="chat"):
    f = fleet(env, name)
    ok = condition(f, "Available").get("status") == "True"
    done = condition(f, "Progressing").get("status") == "False"
    current = (f.get("status") or {}).get("observedGeneration") == f["metadata"]["generation"]
    return f if ok and done and current else None


def running_pods(env, selector):
    pods = env.cluster.core.list_namespaced_pod(env.namespace, label_selector=selector).items
    return [p for p in pods if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]


def events(env, reason):
    out = env.cluster.kubectl("get", "events", "-n", env.namespace, "-o", "json").stdout
    return [e for e in json.loads(out)["items"] if e["reason"] == reason
            and e["involvedObject"]["kind"] == "InferenceFleet"]


def create_chat(env):
    apply_doc(env.cluster, env.namespace, fleet_manifest())
    return wait_for("the fleet to become Available", lambda: available(env), timeout=120)


def test_create_fleet_children_pods_and_status(operator_env):
    env = operator_env
    f = create_chat(env)
    kids = children(env.kube, env.namespace, "chat")
    assert set(kids) == DISAGGREGATED
    status = f["status"]
    assert status["roles"] == {"decode": {"desired": 2, "ready": 2}, "mempool": {"desired": 1, "ready": 1},
                               "prefill": {"desired": 1, "ready": 1}, "router": {"desired": 1, "ready": 1}}
    assert status["routerEndpoint"] == f"http://chat-router.{env.namespace}.svc:8000/v1"
    assert all(c["observedGeneration"] == f["metadata"]["generation"] for c in status["conditions"])
    assert condition(f, "Degraded")["status"] == "False"
    # the pods really run on the simulated GPU nodes, each holding one GPU
    decode = running_pods(env, "kvfleet.io/role=decode")
    assert len(decode) == 2
    for pod in decode:
        assert pod.spec.node_name.startswith("gpu-node-")
        c = pod.spec.containers[0]
        assert c.resources.limits["nvidia.com/gpu"] == "1" and c.resources.requests["nvidia.com/gpu"] == "1"
        assert c.security_context.read_only_root_filesystem and c.security_context.capabilities.drop == ["ALL"]
    prefill = running_pods(env, "kvfleet.io/role=prefill")
    assert len(prefill) == 1
    assert {p.spec.node_selector["nvidia.com/gpu.product"] for p in prefill} == {"NVIDIA-H100-80GB-HBM3"}
    # the shared pods carry the group's label, mount the LoRA variant's adapter, and are what the router's
    # selectors for both variants match
    router = json.loads(kids[("ConfigMap", "chat-config")]["data"]["router.json"])
    assert [(m["variant"], m["servedBy"]) for m in router["models"]] == [
        ("smollm2-base", "smollm2-base"), ("smollm2-support", "smollm2-base")]
    for role, pods in (("decode", decode), ("prefill", prefill)):
        assert {p.metadata.labels["kvfleet.io/variant"] for p in pods} == {"smollm2-base"}
        for pod in pods:
            claims = {v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
            assert claims == {"adapters"}
        for model in router["models"]:
            selector = ",".join(f"{k}={v}" for k, v in model["roles"][role]["selector"].items())
            assert {p.metadata.name for p in running_pods(env, selector)} == {p.metadata.name for p in pods}
        cfg = EngineConfig.from_json(kids[("ConfigMap", "chat-smollm2-base-config")]["data"][f"{role}.engine.json"])
        assert cfg.variant == "smollm2-base" and cfg.cache_policy.key_quantization == "int8"
        assert [a.name for a in cfg.adapters] == ["smollm2-support"]
    # the references list the fleet that uses them
    for kind, name in (("ModelVariant", "smollm2-base"), ("CachePolicy", "int8-shared"), ("SLOClass", "batch")):
        wait_for(f"{kind} {name} usedByFleets", lambda k=kind, n=name: (env.kube.get(k, env.namespace, n).get(
            "status") or {}).get("usedByFleets") == ["chat"])
    assert (env.kube.get("CachePolicy", env.namespace, "long-context").get("status") or {}).get("usedByFleets") == []
    # kopf kept its bookkeeping in annotations, not in status
    assert set(status) <= {"observedGeneration", "conditions", "roles", "routerEndpoint", "sloClasses", "adapters",
                           "kvSharing"}
    # the LoRA variant declares cross-variant KV reuse, which the fleet's per-variant prefix scope turns off
    assert status["kvSharing"] == [{"variant": "smollm2-support", "fromVariant": "smollm2-base", "inEffect": False,
                                    "reason": OFF_BY_POLICY}]
    # ... and says which workloads serve the LoRA variant: the base group's, both roles
    assert status["adapters"] == [
        {"workload": f"chat-smollm2-base-{role}", "variant": "smollm2-base", "adapters": ["smollm2-support"]}
        for role in ("decode", "prefill")]
    # no traffic yet: each class is listed with nothing measured (never a made-up figure)
    assert [(c["name"], c["requests"]) for c in status["sloClasses"]] == [("interactive", 0), ("batch", 0)]
    assert "kvfleet.io/last-handled-configuration" in f["metadata"]["annotations"]


def _hash(dep):
    return dep["spec"]["template"]["metadata"]["annotations"]["kvfleet.io/config-hash"]


def test_cache_policy_change_rolls_the_pods(operator_env):
    env = operator_env
    create_chat(env)
    before = children(env.kube, env.namespace, "chat")
    old_pods = {p.metadata.name for p in running_pods(env, "kvfleet.io/role=decode")}
    env.cluster.kubectl("patch", "cachepolicy", "int8-shared", "-n", env.namespace, "--type=merge",
                        "-p", '{"spec": {"blockSizeTokens": 32}}')

    def rolled():
        kids = children(env.kube, env.namespace, "chat")
        cfg = EngineConfig.from_json(kids[("ConfigMap", "chat-smollm2-base-config")]["data"]["decode.engine.json"])
        dep = kids[("Deployment", "chat-smollm2-base-decode")]
        return cfg.block_size == 32 and _hash(dep) != _hash(before[("Deployment", "chat-smollm2-base-decode")])

    wait_for("the ConfigMap and the pod-template hash to change", rolled)
    f = wait_for("the rollout to finish", lambda: available(env), timeout=120)
    new_pods = running_pods(env, "kvfleet.io/role=decode")
    assert len(new_pods) == 2 and not old_pods & {p.metadata.name for p in new_pods}
    dep = env.kube.get("Deployment", env.namespace, "chat-smollm2-base-decode")
    assert {p.metadata.annotations["kvfleet.io/config-hash"] for p in new_pods} >= {_hash(dep)}
    assert _hash(env.kube.get("Deployment", env.namespace, "chat-router")) == _hash(before[("Deployment", "chat-router")])
    assert condition(f, "Degraded")["status"] == "False"


def test_topology_switch_bounds_drift_and_manual_scale(operator_env):
    env = operator_env
    create_chat(env)
    ns, kubectl = env.namespace, env.cluster.kubectl
    # disaggregated -> colocated: prefill/decode Deployments go, the engine Deployment comes (the LoRA variant
    # rides on it, as it rode on prefill/decode)
    engine = {"minReplicas": 1, "maxReplicas": 3, "resources": {"requests": {"nvidia.com/gpu": 1}},
              "placement": {"tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists",
                                             "effect": "NoSchedule"}]}}
    kubectl("patch", "fleet", "chat", "-n", ns, "--type=merge", "-p", json.dumps(
        {"spec": {"topology": {"mode": "colocated", "prefill": None, "decode": None, "engine": engine}}}))

    def colocated():
        deps = sorted(n for k, n in children(env.kube, ns, "chat") if k == "Deployment")
        return deps == ["chat-router", "chat-smollm2-base-engine"]

    wait_for("prefill/decode replaced by the engine Deployment", colocated)
    f = wait_for("the colocated fleet to become Available", lambda: available(env), timeout=120)
    assert set(f["status"]["roles"]) == {"engine", "mempool", "router"}
    assert events(env, "ChildrenRemoved")
    # new scale bounds: minReplicas 2 -> the operator scales to 2
    kubectl("patch", "fleet", "chat", "-n", ns, "--type=merge",
            "-p", '{"spec": {"topology": {"engine": {"minReplicas": 2}}}}')
    wait_for("engine scaled to the new minimum", lambda: env.kube.get(
        "Deployment", ns, "chat-smollm2-base-engine")["spec"]["replicas"] == 2)
    # a child deleted by hand is restored
    uid = env.kube.get("Deployment", ns, "chat-router")["metadata"]["uid"]
    kubectl("delete", "deployment", "chat-router", "-n", ns)
    wait_for("the router Deployment to be re-created", lambda: (env.kube.get("Deployment", ns, "chat-router") or {})
             .get("metadata", {}).get("uid") not in (None, uid))
    # a field edited by hand is restored
    kubectl("patch", "deployment", "chat-smollm2-base-engine", "-n", ns, "--type=json", "-p",
            '[{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:latest"}]')
    wait_for("the hand-edited image to be reverted", lambda: env.kube.get("Deployment", ns, "chat-smollm2-base-engine")
             ["spec"]["template"]["spec"]["containers"][0]["image"] != "evil:latest")
    # kubectl scale is reverted, with an Event on the fleet saying why
    kubectl("scale", "deployment", "chat-smollm2-base-engine", "-n", ns, "--replicas=5")
    wait_for("the manual scale to be reverted", lambda: env.kube.get(
        "Deployment", ns, "chat-smollm2-base-engine")["spec"]["replicas"] == 2)
    (ev,) = wait_for("a ManualScaleReverted event", lambda: events(env, "ManualScaleReverted"))
    assert "chat-smollm2-base-engine" in ev["message"] and "minReplicas..maxReplicas (2..3)" in ev["message"]
    assert ev["type"] == "Warning"
    wait_for("the fleet to settle", lambda: available(env), timeout=120)


def test_referenced_deletion_degrades_and_fleet_deletion_collects(operator_env):
    env = operator_env
    ns, kubectl = env.namespace, env.cluster.kubectl
    create_chat(env)
    before = children(env.kube, ns, "chat")
    kubectl("delete", "cachepolicy", "int8-shared", "-n", ns)
    f = wait_for("Degraded=MissingReference", lambda: (lambda f: f if condition(f, "Degraded").get("reason")
                                                          == "MissingReference" else None)(fleet(env)))
    assert condition(f, "Degraded")["status"] == "True"
    assert "CachePolicy 'int8-shared' not found" in condition(f, "Degraded")["message"]
    assert wait_for("a MissingReference Warning event", lambda: events(env, "MissingReference"))
    # the last applied children keep serving, untouched
    after = children(env.kube, ns, "chat")
    assert {k: v["metadata"]["uid"] for k, v in after.items()} == {k: v["metadata"]["uid"] for k, v in before.items()}
    assert condition(f, "Available")["status"] == "True"
    # the policy comes back: the fleet recovers by itself
    kubectl("apply", "-n", ns, "-f", "examples/03-cachepolicy.yaml")
    wait_for("Degraded=False again", lambda: condition(fleet(env), "Degraded").get("status") == "False")
    assert events(env, "Recovered")
    # a missing ModelVariant reference on a new fleet: nothing applied, clearly degraded
    bad = fleet_manifest("other")
    bad["spec"]["variants"] = [{"name": "does-not-exist"}]
    apply_doc(env.cluster, ns, bad)
    f = wait_for("the other fleet to be Degraded", lambda: (lambda f: f if condition(f, "Degraded").get("status")
                                                             == "True" else None)(fleet(env, "other")))
    assert "ModelVariant 'does-not-exist' not found" in condition(f, "Degraded")["message"]
    assert condition(f, "Available")["reason"] == "NotApplied" and not children(env.kube, ns, "other")
    # ... and reconciles by itself once the variant appears
    variant = env.kube.get("ModelVariant", ns, "smollm2-base")
    doc = {"apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": "does-not-exist"},
           "spec": variant["spec"]}
    apply_doc(env.cluster, ns, doc)
    wait_for("the other fleet's children", lambda: ("Deployment", "other-router") in children(env.kube, ns, "other"))
    # deleting a fleet deletes everything it created (owner references + the garbage collector)
    kubectl("delete", "fleet", "chat", "other", "-n", ns, "--wait=true", timeout=60)
    wait_for("the garbage collector to remove every child", lambda: not children(env.kube, ns, "chat")
             and not children(env.kube, ns, "other"), timeout=90)
    wait_for("the pods to go", lambda: not running_pods(env, "kvfleet.io/fleet in (chat,other)"), timeout=90)
    wait_for("usedByFleets emptied", lambda: (env.kube.get("ModelVariant", ns, "smollm2-base").get("status") or {})
             .get("usedByFleets") == [])
