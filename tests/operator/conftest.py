"""Fixtures for the operator's cluster tests (the control plane itself comes from e2e/pytest_plugin.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from k8s_testlib import OperatorProcess, adapters_pvc, apply_references, install_crds, kube_for
from kvfleet.operator.kube import Kube


@dataclass
class OperatorEnv:
    """A namespace with the example references, an operator watching it, and clients."""

    cluster: Any
    namespace: str
    kube: Kube
    operator: OperatorProcess


@pytest.fixture(scope="session")
def crds(cluster: Any) -> None:
    install_crds(cluster)


@pytest.fixture
def operator_env(cluster: Any, namespace: str, crds: None, tmp_path: Path) -> Iterator[OperatorEnv]:
    adapters_pvc(cluster, namespace)
    apply_references(cluster, namespace)
    op = OperatorProcess(cluster.kubeconfig, tmp_path, ["-n", namespace]).start()
    kube = kube_for(cluster.kubeconfig)
    env = OperatorEnv(cluster, namespace, kube, op)
    try:
        yield env
    finally:
        # Fleets are deleted while the operator still runs; GC needs no operator anyway (no finalizers).
        cluster.kubectl("delete", "inferencefleets", "--all", "-n", namespace, "--wait=false", check=False)
        op.kill()
        kube.close()
        cluster.kubectl("delete", "pv", f"adapters-{namespace}", "--wait=false", check=False)
