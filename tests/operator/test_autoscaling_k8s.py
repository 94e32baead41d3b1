"""Observe -> plan -> act on the real control plane, with real engine processes behind simulated pods.

A fleet of the tiny model (colocated, then disaggregated) exports its spans and counts to the operator's
OTLP receiver. Load in a class whose TTFT target no request can meet drops attainment below its target:
the operator scales the right role up (the engine; prefill when disaggregated, decode staying as it is)
and says why (status, Event). The load stops: once the scale-down
stabilisation has passed with every signal good, it scales back down. Attainment and the class's
counts are in the fleet's status throughout.
"""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
from k8s_testlib import apply_doc, wait_for

from e2e.harness import serving_pod_ips
from e2e.nodes import GPU_TOLERATION

pytestmark = pytest.mark.k8s


def _fleet(env):
    return env.kube.get("InferenceFleet", env.namespace, "auto")


def _replicas(env, role: str) -> int:
    dep = env.kube.get("Deployment", env.namespace, f"auto-tiny-{role}")
    return int(dep["spec"]["replicas"]) if dep else 0


ROLE = {"minReplicas": 1, "maxReplicas": 2, "maxNumSeqs": 8,
        "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
        "placement": {"tolerations": [GPU_TOLERATION]}}


@pytest.mark.parametrize("topology", ["colocated", "disaggregated"])
def test_attainment_below_target_scales_up_and_back_down(operator_env, podrunner, topology):
    """Colocated: the engine scales. Disaggregated: a TTFT breach is prefill's, so prefill scales, decode not."""
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
            "topology": {"mode": "colocated", "engine": ROLE} if topology == "colocated" else
            {"mode": "disaggregated", "prefill": ROLE, "decode": ROLE},
        }})
    scaled = "engine" if topology == "colocated" else "prefill"

    def serving(role: str, port: int) -> list[str]:
        pods = json.loads(env.cluster.kubectl("get", "pods", "-n", ns, "-o", "json", "-l",
                                              f"kvfleet.io/fleet=auto,kvfleet.io/role={role}").stdout)["items"]
        return serving_pod_ips(pods, port=port)

    entry, port = ("engine", 8080) if topology == "colocated" else ("router", 8000)
    if topology == "disaggregated":
        wait_for("prefill and decode serving", lambda: serving("prefill", 8080) and serving("decode", 8080),
                 timeout=240)
    (ip,) = wait_for(f"one {entry} pod serving", lambda: serving(entry, port), timeout=240)
    assert _replicas(env, scaled) == 1
    client = openai.OpenAI(base_url=f"http://{ip}:{port}/v1", api_key="x", max_retries=0, timeout=60)

    stop = threading.Event()

    def load():  # a steady trickle, well over the planner's 20 requests of evidence per window
        while not stop.is_set():
            try:
                client.completions.create(model="tiny", prompt="Hello there, how are you?", max_tokens=4,
                                          temperature=0)
            except openai.APIStatusError:  # the router's first moments: no ready decode pod seen yet
                time.sleep(0.2)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(f"the {scaled} role scaled up to 2", lambda: _replicas(env, scaled) == 2, timeout=120)
        # the status is written after the scale in the same reconcile: the replicas can be seen a moment first
        def tight_class() -> dict | None:
            rows = [c for c in _fleet(env)["status"].get("sloClasses") or () if c["name"] == "tight"]
            return rows[0] if rows and rows[0]["requests"] >= 20 else None

        tight = wait_for("status: the tight class's evidence", tight_class, timeout=30)
        assert tight["attainment"] < 0.9, tight
        f = _fleet(env)
        assert f["status"]["attainment"] < 0.9
        # per role, from the pods' gauges (exported every few seconds: give the first export time to arrive)
        wait_for("KV pressure of the role in status",
                 lambda: "kvPressure" in _fleet(env)["status"]["roles"][scaled], timeout=30)
        assert 0 <= _fleet(env)["status"]["roles"][scaled]["kvPressure"] <= 1
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
    wait_for(f"the {scaled} role scaled back to 1", lambda: _replicas(env, scaled) == 1, timeout=150)
    # status.roles counts the Deployments as the operator last observed them: it follows at its next write
    wait_for(f"status: the {scaled} role desires 1",
             lambda: _fleet(env)["status"]["roles"][scaled]["desired"] == 1, timeout=30)
    assert _replicas(env, scaled) == 1
    if topology == "disaggregated":
        assert _replicas(env, "decode") == 1  # TPOT was met: decode never scaled
