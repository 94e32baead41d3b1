"""Two operator replicas with kopf peering: only the higher-priority one reconciles; it hands over on exit."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
from k8s_testlib import (
    OperatorProcess,
    adapters_pvc,
    apply_doc,
    apply_references,
    condition,
    fleet_manifest,
    kube_for,
    wait_for,
)
from op_testlib import ROOT

pytestmark = pytest.mark.k8s


def probe(op: OperatorProcess) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.port}/healthz", timeout=5) as resp:
        return json.loads(resp.read())["queue"]


def test_standby_replica_stays_idle_until_the_leader_leaves(cluster, namespace, crds, tmp_path):
    peering = cluster.helm("template", "kvfleet", str(ROOT / "charts" / "kvfleet"), "--set", "peering.enabled=true",
                           "--show-only", "templates/peering.yaml").stdout
    crd, obj = peering.split("\n---\n", 1)
    cluster.kubectl("apply", "-f", "-", input=crd)
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=30s")
    name = f"kvfleet-{namespace}"
    cluster.kubectl("apply", "-f", "-", input=obj.replace("name: kvfleet\n", f"name: {name}\n"))
    adapters_pvc(cluster, namespace)
    apply_references(cluster, namespace)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    kube = kube_for(cluster.kubeconfig)
    leader = OperatorProcess(cluster.kubeconfig, tmp_path / "a", ["-A", "--peering", name,
                                                                   "--priority", "10"]).start()
    standby = OperatorProcess(cluster.kubeconfig, tmp_path / "b", ["-A", "--peering", name, "--priority", "1"])
    try:
        leader.wait_ready()
        # the standby starts once the leader is announced: two replicas started at the same instant both run
        # until each sees the other (kopf's own rule), which is not what this test is about
        wait_for("the leader to announce itself in the peering object", lambda: any(
            int(peer.get("priority", 0)) == 10 for peer in (kube.request(
                "GET", f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}").get("status") or {}).values()
            if isinstance(peer, dict)), timeout=30)
        standby.start()
        standby.wait_ready()
        apply_doc(cluster, namespace, fleet_manifest())
        wait_for("the leader to make the fleet Available", lambda: condition(
            kube.get("InferenceFleet", namespace, "chat"), "Available").get("status") == "True", timeout=120)
        # probe answers are cached by kopf for a few seconds
        wait_for("the leader's probe to count reconciles", lambda: probe(leader)["reconciles"] > 0, timeout=30)
        time.sleep(10.5)  # past kopf's probe cache, so the standby's answer is current
        assert probe(standby)["reconciles"] == 0
        leader.kill(signal.SIGTERM)  # a graceful exit removes the leader from the peering object
        cluster.kubectl("patch", "fleet", "chat", "-n", namespace, "--type=merge",
                        "-p", '{"spec": {"topology": {"decode": {"minReplicas": 3}}}}')
        wait_for("the standby to take over and reconcile the change", lambda: kube.get(
            "Deployment", namespace, "chat-smollm2-base-decode")["spec"]["replicas"] == 3, timeout=90)
        wait_for("the standby's probe to count reconciles", lambda: probe(standby)["reconciles"] > 0, timeout=30)
    finally:
        cluster.kubectl("delete", "fleet", "--all", "-n", namespace, "--wait=false", check=False)
        leader.kill()
        standby.kill()
        kube.close()
        cluster.kubectl("delete", "clusterkopfpeering", name, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", f"adapters-{namespace}", "--wait=false", check=False)
