"""Simulated GPU nodes: KWOK-managed Nodes that advertise ``nvidia.com/gpu`` like an 8xH100 host.

Pods land on them only if they tolerate ``kwok.x-k8s.io/node=fake:NoSchedule``
(``GPU_TOLERATION``); KWOK then marks them Running with a loopback pod IP.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Equal", "value": "fake", "effect": "NoSchedule"}


def api_client(kubeconfig: Path | str, pool: int = 16) -> client.ApiClient:
    """A kubernetes ``ApiClient`` for ``kubeconfig`` with a connection pool fit for ``pool`` threads."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)


def gpu_node_manifest(name: str, *, gpus: int = 8, zone: str = "zone-a", cpu: str = "208",
                      memory: str = "1800Gi", pods: str = "110") -> dict[str, Any]:
    """One fake GPU node; status capacity/allocatable are kept by KWOK's node-initialize stage."""
    resources = {"cpu": cpu, "memory": memory, "pods": pods, "nvidia.com/gpu": str(gpus),
                 "ephemeral-storage": "2Ti"}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "kvfleet.io/node-pool": "gpu",
                "nvidia.com/gpu.product": GPU_PRODUCT, "nvidia.com/gpu.count": str(gpus),
                "topology.kubernetes.io/zone": zone,
            },
        },
        "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def create_gpu_nodes(kubeconfig: Path | str, count: int, *, prefix: str = "gpu-node", start: int = 0,
                     zones: tuple[str, ...] = ("zone-a", "zone-b"), gpus: int = 8, threads: int = 16) -> list[str]:
    """Create ``count`` GPU nodes named ``{prefix}-{i}`` (zones alternate); existing ones are kept."""
    names = [f"{prefix}-{i}" for i in range(start, start + count)]
    with api_client(kubeconfig, threads) as api:
        core = client.CoreV1Api(api)

        def create(i_name: tuple[int, str]) -> None:
            i, name = i_name
            try:
                core.create_node(gpu_node_manifest(name, gpus=gpus, zone=zones[i % len(zones)]))
            except ApiException as exc:
                if exc.status != 409:
                    raise

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(create, enumerate(names, start)))
    return names


def wait_nodes_ready(kubeconfig: Path | str, names: list[str], timeout_s: float = 120.0) -> None:
    """Block until every named node reports Ready=True (set by KWOK)."""
    wanted = set(names)
    deadline = time.monotonic() + timeout_s
    with api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        while True:
            ready = {
                n.metadata.name for n in core.list_node(label_selector="type=kwok").items
                if any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
            }
            missing = wanted - ready
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} nodes not Ready, e.g. {sorted(missing)[:3]}")
            time.sleep(0.5)


def advertise_fake_gpus(kubeconfig: Path | str, gpus: int = 8) -> list[str]:
    """On a real cluster (kind) with no GPUs: advertise ``nvidia.com/gpu`` on nodes labelled
    ``kvfleet.io/node-pool=gpu`` by patching their status, as the device plugin would.
    Returns the patched node names (none if some node already has GPUs)."""
    with api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        nodes = core.list_node().items
        if any((n.status.allocatable or {}).get("nvidia.com/gpu", "0") != "0" for n in nodes):
            return []
        names = [n.metadata.name for n in nodes if (n.metadata.labels or {}).get("kvfleet.io/node-pool") == "gpu"]
        for name in names:
            gpu = {"nvidia.com/gpu": str(gpus)}
            patch = {"status": {"capacity": gpu, "allocatable": gpu}}
            core.patch_node_status(name, patch)
        return names
