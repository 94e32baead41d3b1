"""Helpers for the operator's cluster tests: the operator as a real subprocess, waits, fleet setup."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kvfleet.operator.kube import CHILD_KINDS, Kube
from op_testlib import EXAMPLES, ROOT, example_docs

from e2e.harness import wait_for  # noqa: F401 - re-exported for the tests
from e2e.nodes import GPU_TOLERATION

TOLERATE_KWOK = [GPU_TOLERATION]


def kube_for(kubeconfig: Path | str) -> Kube:
    cfg = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return Kube(cfg)


def install_crds(cluster: Any) -> None:
    for crd in sorted((ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *[f"crd/{p.stem.split('_', 1)[1]}.kvfleet.io" for p in (ROOT / "crds").glob("*.yaml")])


def adapters_pvc(cluster: Any, namespace: str) -> None:
    """The PVC the `smollm2-support` example mounts, pre-bound to a hostPath PV."""
    pv = f"adapters-{namespace}"
    docs = [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                  "persistentVolumeReclaimPolicy": "Delete", "hostPath": {"path": "/tmp/kvfleet-adapters"},
                  "claimRef": {"namespace": namespace, "name": "adapters"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters", "namespace": namespace},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def apply_references(cluster: Any, namespace: str) -> None:
    """The example ModelVariants, SLOClasses and CachePolicies in `namespace`."""
    for name in ("01-modelvariants.yaml", "02-sloclasses.yaml", "03-cachepolicy.yaml"):
        cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / name))


def fleet_manifest(name: str = "chat") -> dict[str, Any]:
    """The example fleet, with the router and pool also tolerating the simulated GPU nodes' taint."""
    fleet = copy.deepcopy(next(d for d in example_docs() if d["kind"] == "InferenceFleet"))
    fleet["metadata"]["name"] = name
    fleet["spec"]["router"]["placement"] = {"tolerations": TOLERATE_KWOK}
    fleet["spec"]["mempool"]["placement"] = {"tolerations": TOLERATE_KWOK}
    return fleet


def apply_doc(cluster: Any, namespace: str, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c["type"] == type_:
            return dict(c)
    return {}


class OperatorProcess:
    """`python -m kvfleet.operator` as a subprocess (so SIGKILL is a real crash)."""

    def __init__(self, kubeconfig: Path | str, log_dir: Path, args: list[str], env: dict[str, str] | None = None):
        self.kubeconfig, self.log_dir, self.args = str(kubeconfig), log_dir, args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> OperatorProcess:
        self.starts += 1
        log = open(self.log_dir / f"operator-{self.starts}.log", "wb")  # noqa: SIM115 - lives with the process
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "PYTHONUNBUFFERED": "1", **self.env}
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        liveness = f"http://127.0.0.1:{self.port}/healthz"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvfleet.operator", "--liveness", liveness, "--resync-seconds", "5", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until kopf's liveness endpoint answers (startup done, watches running)."""
        def ok() -> bool:
            assert self.alive(), f"operator exited:\n{self.logs()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for("the operator's liveness endpoint", ok, timeout=timeout, interval=0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.log_dir.glob("operator-*.log")))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def children(kube: Kube, namespace: str, fleet: str) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for kind in CHILD_KINDS:
        for obj in kube.list(kind, namespace, f"kvfleet.io/fleet={fleet}"):
            out[(kind, obj["metadata"]["name"])] = obj
    return out


def greedy_completion(client: Any, model: str, prompt: str, max_tokens: int = 8) -> str | None:
    """An `openai` SDK greedy completion through a fleet's router; None while it answers 4xx/5xx (a 429 until
    the router has discovered ready pods)."""
    import openai

    try:
        return str(client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text)
    except openai.APIStatusError:
        return None
