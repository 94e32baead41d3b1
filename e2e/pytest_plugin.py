"""pytest fixtures for tests marked ``k8s``: one real control plane per test session.

``cluster`` starts a local control plane (``e2e.cluster.LocalCluster``) with four
simulated 8-GPU nodes, or, when ``KVFLEET_E2E_KUBECONFIG`` names a kubeconfig (a kind
cluster, say), uses that cluster instead. Missing binaries are built first. If the
cluster cannot start the fixture raises: the tests error, they are never skipped.

``podrunner`` runs opted-in pods as local processes (local clusters only);
``namespace`` gives each test a fresh namespace, deleted afterwards.

``otel_collector`` (no cluster needed) is a real OpenTelemetry Collector on free loopback ports
(``e2e.otelcol``, built by e2e/build-collector.sh if the cache is cold): two OTLP/gRPC receivers,
``operator`` and ``user``, each writing OTLP JSON lines to its own file; stopped after the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from e2e.cluster import LocalCluster, find_bin_dir, prune_dead_clusters
from e2e.nodes import advertise_fake_gpus, api_client, create_gpu_nodes, wait_nodes_ready
from e2e.otelcol import Collector
from e2e.podrunner import PodRunner

EXISTING_KUBECONFIG_ENV = "KVFLEET_E2E_KUBECONFIG"
GPU_NODES = 4


@dataclass
class Cluster:
    """What a test gets: kubeconfig, CLI wrappers and a kubernetes ``ApiClient``."""

    kubeconfig: Path
    bin_dir: Path | None
    api: client.ApiClient
    local: LocalCluster | None = None  # None when running against an existing (kind) cluster

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    def _tool(self, name: str) -> str:
        if self.bin_dir is not None and (self.bin_dir / name).exists():
            return str(self.bin_dir / name)
        found = shutil.which(name)
        if found is None:
            raise FileNotFoundError(f"{name} not found in {self.bin_dir} or on PATH")
        return found

    def run(self, tool: str, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl``/``helm`` against this cluster; raises with its stderr when ``check`` fails."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        proc = subprocess.run([self._tool(tool), *args], capture_output=True, text=True, input=input,
                              env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
        return proc

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, check=check, input=input, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, check=check, timeout=timeout)

    def add_gpu_nodes(self, count: int, prefix: str = "gpu-node", start: int = 0) -> list[str]:
        """Create (or keep) ``count`` simulated GPU nodes and wait until they are Ready."""
        names = create_gpu_nodes(self.kubeconfig, count, prefix=prefix, start=start)
        wait_nodes_ready(self.kubeconfig, names)
        return names


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's control plane (local, or the one ``KVFLEET_E2E_KUBECONFIG`` points at)."""
    existing = os.environ.get(EXISTING_KUBECONFIG_ENV)
    if existing:
        bin_dir = Path(os.environ["KVFLEET_BIN_DIR"]) if os.environ.get("KVFLEET_BIN_DIR") else None
        advertise_fake_gpus(existing)
        with api_client(existing) as api:
            yield Cluster(Path(existing), bin_dir, api)
        return
    prune_dead_clusters()  # what a killed earlier run left behind (its processes died with it)
    local = LocalCluster.start(f"pytest-{os.getpid()}", bin_dir=find_bin_dir(), tie_to_parent=True)
    try:
        handle = Cluster(local.kubeconfig, local.bin_dir, api_client(local.kubeconfig), local)
        handle.add_gpu_nodes(GPU_NODES)
        yield handle
        handle.api.close()
    finally:
        local.stop()


@pytest.fixture(scope="session")
def podrunner(cluster: Cluster) -> Iterator[PodRunner]:
    """Runs pods annotated ``kvfleet.io/run-locally: "true"`` as local processes (local cluster only)."""
    if cluster.local is None:
        pytest.skip("the pod runner needs the local control plane (pod IPs on loopback)")
    with PodRunner(cluster.kubeconfig, cluster.local.dir / "pods") as runner:
        yield runner


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    yield name
    cluster.core.delete_namespace(name)


@pytest.fixture
def otel_collector(tmp_path: Path) -> Iterator[Collector]:
    col = Collector(tmp_path / "otelcol", ["operator", "user"]).start()
    try:
        yield col
    finally:
        col.stop()
