"""Deployments of GPU pods schedule onto simulated GPU nodes and are garbage-collected."""

from __future__ import annotations

import pytest

from e2e.harness import wait_for
from e2e.nodes import GPU_PRODUCT, GPU_TOLERATION

pytestmark = pytest.mark.k8s


def gpu_deployment(name: str, replicas: int, gpus: int = 1) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "tolerations": [GPU_TOLERATION],
                "nodeSelector": {"kvfleet.io/node-pool": "gpu"},
                "containers": [{"name": "engine", "image": "registry.k8s.io/pause:3.10",
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
            }},
        },
    }


def test_gpu_deployment_runs_on_gpu_nodes_and_is_garbage_collected(cluster, namespace):
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("engine", 3))

    def running():
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=engine").items
        ok = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip]
        return ok if len(ok) == 3 else None

    pods = wait_for("3 Running pods", running, 60)
    for pod in pods:
        node = cluster.core.read_node(pod.spec.node_name)
        assert node.metadata.labels["nvidia.com/gpu.product"] == GPU_PRODUCT
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
        owner = pod.metadata.owner_references[0]
        assert owner.kind == "ReplicaSet" and owner.controller
    if cluster.is_local:
        assert all(p.status.pod_ip.startswith(cluster.local.pod_cidr.split(".0.0/")[0] + ".") for p in pods)

    cluster.apps.delete_namespaced_deployment("engine", namespace)
    wait_for("pods garbage-collected",
             lambda: not cluster.core.list_namespaced_pod(namespace, label_selector="app=engine").items, 60)
    assert not cluster.apps.list_namespaced_replica_set(namespace).items


def test_gpu_capacity_is_enforced_by_the_scheduler(cluster, namespace):
    """A pod wanting more GPUs than any node has stays Pending with a FailedScheduling reason."""
    cluster.apps.create_namespaced_deployment(namespace, gpu_deployment("too-big", 1, gpus=9))

    def unschedulable():
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=too-big").items
        conds = [c for p in pods for c in (p.status.conditions or []) if c.type == "PodScheduled"]
        return conds and conds[0].status == "False" and "nvidia.com/gpu" in (conds[0].message or "")

    wait_for("PodScheduled=False for lack of GPUs", unschedulable, 60)
