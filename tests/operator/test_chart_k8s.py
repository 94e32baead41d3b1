"""The Helm chart on the real cluster: its RBAC is enough for the operator, and no more; upgrade and
uninstall leave the cluster clean.

The chart is installed with `operator.replicas=0` (no image can run on KWOK nodes); the operator then
runs here as a subprocess with a kubeconfig holding the chart ServiceAccount's token, so every request
it makes is authorized by exactly the chart's (Cluster)Role.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from k8s_testlib import OperatorProcess, apply_doc, condition, fleet_manifest, wait_for
from op_testlib import ROOT

from e2e import harness

pytestmark = pytest.mark.k8s

CHART = ROOT / "charts" / "kvfleet"
RELEASE = "kvfleet"


def token_kubeconfig(cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a bound token from `kubectl create token`)."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    return harness.token_kubeconfig(cluster.kubeconfig, token, path)


def release_objects(cluster, namespace: str) -> list[str]:
    kinds = "deployments,services,serviceaccounts,roles,rolebindings"
    found = cluster.kubectl("get", kinds, "-n", namespace, "-l", f"app.kubernetes.io/instance={RELEASE}",
                            "-o", "name").stdout.split()
    found += cluster.kubectl("get", "clusterroles,clusterrolebindings", "-l",
                             f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.split()
    return found


def test_chart_rbac_is_sufficient_and_minimal(cluster, namespace, crds, tmp_path):
    from k8s_testlib import adapters_pvc, apply_references, kube_for

    system = f"{namespace}-sys"
    cluster.kubectl("create", "namespace", system)
    try:
        cluster.helm("install", RELEASE, str(CHART), "-n", system, "--set", "operator.replicas=0", "--wait")
        deployment = cluster.apps.read_namespaced_deployment(RELEASE, system)
        assert deployment.spec.replicas == 0
        who = f"system:serviceaccount:{system}:{RELEASE}"

        def can(*args: str) -> bool:
            out = cluster.kubectl("auth", "can-i", *args, f"--as={who}", check=False).stdout.strip()
            return out == "yes"

        # minimal: no Secrets, no Nodes, pods read-only (what it grants each fleet's router, and no more),
        # no cluster-wide RBAC, nothing in other API groups
        assert not can("get", "secrets", "-n", namespace) and not can("list", "secrets", "-A")
        assert not can("delete", "nodes") and not can("get", "nodes")
        assert can("list", "pods", "-n", namespace) and not can("create", "pods", "-n", namespace)
        assert not can("delete", "pods", "-n", namespace) and not can("create", "pods/exec", "-n", namespace)
        assert not can("create", "clusterroles") and not can("delete", "inferencefleets", "-n", namespace)
        assert not can("create", "clusterrolebindings")
        assert not can("create", "inferencefleets", "-n", namespace)
        # sufficient: what the operator really does
        for verb, resource in (("patch", "deployments.apps"), ("delete", "statefulsets.apps"),
                               ("create", "configmaps"), ("patch", "inferencefleets.kvfleet.io/status"),
                               ("watch", "modelvariants.kvfleet.io"), ("create", "events"),
                               ("create", "serviceaccounts"), ("create", "roles.rbac.authorization.k8s.io"),
                               ("patch", "rolebindings.rbac.authorization.k8s.io")):
            assert can(verb, resource, "-n", namespace), (verb, resource)

        # the operator, authenticated as the chart's ServiceAccount, passes the fleet create test
        adapters_pvc(cluster, namespace)
        apply_references(cluster, namespace)
        kubeconfig = token_kubeconfig(cluster, system, RELEASE, tmp_path / "sa.kubeconfig")
        op = OperatorProcess(kubeconfig, tmp_path, ["--all-namespaces"]).start()
        kube = kube_for(cluster.kubeconfig)
        try:
            op.wait_ready()
            apply_doc(cluster, namespace, fleet_manifest())

            def available():
                f = kube.get("InferenceFleet", namespace, "chat")
                ok = condition(f, "Available").get("status") == "True"
                return f if ok and condition(f, "Degraded").get("status") == "False" else None

            f = wait_for("the fleet to become Available under the chart's RBAC", available, timeout=120)
            # one decode Deployment (minReplicas 2): the LoRA variant rides on the base's pods
            assert f["status"]["roles"]["decode"] == {"desired": 2, "ready": 2}
            wait_for("usedByFleets written under the chart's RBAC", lambda: (kube.get(
                "ModelVariant", namespace, "smollm2-base").get("status") or {}).get("usedByFleets") == ["chat"])
            cluster.kubectl("delete", "fleet", "chat", "-n", namespace, "--wait=true", timeout=60)
        finally:
            op.kill()
            kube.close()
        logs = op.logs()
        # an HTTP 403 status, not the digits of a log timestamp's milliseconds (",403]" failed a CI run)
        assert not re.search(r"(?<![,\d])403(?!\d)", logs) and "Forbidden" not in logs, logs

        # upgrade: watch only the test namespace (Roles instead of the ClusterRole)
        cluster.helm("upgrade", RELEASE, str(CHART), "-n", system, "--set", "operator.replicas=0",
                     "--set", f"operator.watchNamespaces={{{namespace}}}", "--wait")
        assert can("patch", "deployments.apps", "-n", namespace)
        assert not can("patch", "deployments.apps", "-n", "default")
        assert cluster.kubectl("get", "clusterrole", RELEASE, check=False).returncode != 0
        # strict values: an unknown key fails the install
        bad = cluster.helm("upgrade", RELEASE, str(CHART), "-n", system, "--set", "operator.replica=1", check=False)
        assert bad.returncode != 0 and "additional properties 'replica' not allowed" in bad.stderr + bad.stdout
    finally:
        cluster.helm("uninstall", RELEASE, "-n", system, "--wait", check=False)
    assert release_objects(cluster, system) == [] and release_objects(cluster, namespace) == []
    cluster.kubectl("delete", "namespace", system, "--wait=false")
