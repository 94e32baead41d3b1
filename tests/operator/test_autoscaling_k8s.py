"""Observe -> plan -> act on the real control plane, with real engine processes behind simulated pods.

A colocated fleet of the tiny model exports its spans and counts to the operator's OTLP receiver.
Load in a class whose TTFT target no request can meet drops attainment below its target: the operator
scales the engine role up and says why (status, Event). The load stops: once the scale-down
stabilisation has passed with every signal good, it scales back down. Attainment and the class's
counts are in the fleet's status throughout.
"""

from __future__ import annotations

import json
import threading

import openai
import pytest
from k8s_testlib import apply_doc, wait_for

from e2e.harness import serving_pod_ips
from e2e.nodes import GPU_TOLERATION

pytestmark = pytest.mark.k8s


def _fleet(env):
    return env.kube.get("InferenceFleet", env.namespace, "auto")


def _engine_replicas(env) -> int:
    dep = env.kube.get("Deployment", env.namespace, "auto-tiny-engine")
    return int(dep["spec"]["replicas"]) if dep else 0


def test_attainment_below_target_scales_up_and_back_down(operator_env, podrunner):
    env = operator_env
    ns = env.namespace
    apply_doc(env.cluster, ns, {
        "apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": "tiny"},
        "spec": {"family": "tiny", "base": {"builtin": "tiny-llama"}, "servedModelName": "tiny", "dtype": "float32"}})
    apply_doc(env.cluster, ns, {  # no request can meet 1 ms TTFT: attainment 0 < 0.9
        "apiVersion": "kvfleet.io/v1alpha1", "kind": "SLOClass", "metadata": {"name": "tight"},
        "spec": {"ttftMs": 1, "tpotMs": 1000, "attainmentTarget": 0.9, "priority": 900}})
    apply_doc(env.cluster, ns, {
        "apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet", "metadata": {"name": "auto"},
        "spec": {
            "variants": [{"name": "tiny"}], "sloClasses": ["tight"], "defaultSloClass": "tight",
            "podAnnotations": {"kvfleet.io/run-locally": "true"}, "gpuHourCostUsd": 2.5,
            "router": {"placement": {"tolerations": [GPU_TOLERATION]}},
            "autoscaling": {"enabled": True, "intervalSeconds": 2, "windowSeconds": 15,
                            "scaleDownStabilizationSeconds": 15},
            "topology": {"mode": "colocated", "engine": {
                "minReplicas": 1, "maxReplicas": 2, "maxNumSeqs": 8,
                "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
                "placement": {"tolerations": [GPU_TOLERATION]}}},
        }})

    def engines():
        pods = json.loads(env.cluster.kubectl("get", "pods", "-n", ns, "-o", "json", "-l",
                                              "kvfleet.io/fleet=auto,kvfleet.io/role=engine").stdout)["items"]
        return serving_pod_ips(pods)

    (ip,) = wait_for("one engine pod serving", engines, timeout=240)
    assert _engine_replicas(env) == 1
    client = openai.OpenAI(base_url=f"http://{ip}:8080/v1", api_key="x", max_retries=0, timeout=60)

    stop = threading.Event()

    def load():  # a steady trickle, well over the planner's 20 requests of evidence per window
        while not stop.is_set():
            client.completions.create(model="tiny", prompt="Hello there, how are you?", max_tokens=4, temperature=0)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for("the engine role scaled up to 2", lambda: _engine_replicas(env) == 2, timeout=120)
        f = _fleet(env)
        (tight,) = [c for c in f["status"]["sloClasses"] if c["name"] == "tight"]
        assert tight["requests"] >= 20 and tight["attainment"] < 0.9, tight
        assert f["status"]["attainment"] < 0.9
        events = json.loads(env.cluster.kubectl("get", "events", "-n", ns, "-o", "json",
                                                "--field-selector", "involvedObject.name=auto").stdout)["items"]
        assert any("tight" in e["message"] and "attainment" in e["message"] for e in events), \
            [e["message"] for e in events]
        stale = {c["type"]: c for c in f["status"]["conditions"]}["TelemetryStale"]
        assert stale["status"] == "False"
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    # no load: once the window has emptied and the stabilisation passed, one pod goes
    wait_for("the engine role scaled back to 1", lambda: _engine_replicas(env) == 1, timeout=150)
    assert _fleet(env)["status"]["roles"]["engine"]["desired"] == 1
