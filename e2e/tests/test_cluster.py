"""The launcher itself: several clusters side by side, a clean teardown, kubectl and helm work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from e2e import procs
from e2e.cluster import CLUSTERS_ROOT

pytestmark = pytest.mark.k8s
REPO = Path(__file__).resolve().parents[2]


def test_server_version_and_helm(cluster):
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    cluster.helm("list", "--all-namespaces")


def test_second_cluster_via_cli_side_by_side(cluster):
    if not cluster.is_local:
        pytest.skip("launcher test needs the local control plane")
    name = f"pytest-side-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "KVFLEET_BIN_DIR": str(cluster.bin_dir)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "e2e.cluster", *args, "--name", name], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=180)

    up = cli("up", "--gpu-nodes", "2", "--no-podrunner")
    try:
        assert up.returncode == 0, up.stderr
        kubeconfig = up.stdout.splitlines()[0].removeprefix("export KUBECONFIG=")
        status = json.loads(cli("status").stdout)
        assert all(status["components"].values())
        assert status["server"] != cluster.local.server and status["pod_cidr"] != cluster.local.pod_cidr
        nodes = subprocess.run([str(cluster.bin_dir / "kubectl"), "--kubeconfig", kubeconfig, "get", "nodes",
                                "-o", "name"], capture_output=True, text=True, check=True).stdout.split()
        assert nodes == ["node/gpu-node-0", "node/gpu-node-1"]
        pids = list(json.loads((CLUSTERS_ROOT / name / "state.json").read_text())["pids"].values())
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert not (CLUSTERS_ROOT / name).exists()
    assert not any(procs.alive(pid) for pid in pids)
    assert all(cluster.local.status().values()), "the session cluster must be unaffected"
