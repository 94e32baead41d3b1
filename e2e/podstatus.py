"""Pod status for locally run pods: readiness probes and process exit, written back to the API.

KWOK marks a pod Ready the moment it is scheduled. For a pod the pod runner really
runs, that would send traffic to a process still loading its model, so when the
container has a ``readinessProbe`` (``httpGet``, ``tcpSocket`` or ``exec``) the pod is
first patched to Ready=False and flipped to Ready=True once the probe passes against
the local process. When the process exits on its own, the container is reported
terminated (exit code, reason) and the pod not ready; it is not restarted.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from kubernetes import client


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    return int(named[port])


def probe_once(probe: dict[str, Any], container: dict[str, Any], pod_ip: str, env: dict[str, str],
               cwd: str, exec_prefix: tuple[str, ...] = ()) -> bool:
    """Run one readiness check against the local process; True if it passes.

    ``exec_prefix`` runs an exec probe inside the container (image mode: ``podman exec NAME``).
    """
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"{get.get('scheme', 'HTTP').lower()}://{get.get('host') or pod_ip}:{_port(container, get['port'])}"
            req = urllib.request.Request(url + get.get("path", "/"),
                                         headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return 200 <= resp.status < 400
        if "tcpSocket" in probe:
            sock = probe["tcpSocket"]
            with socket.create_connection((sock.get("host") or pod_ip, _port(container, sock["port"])), timeout):
                return True
        if "exec" in probe:
            done = subprocess.run([*exec_prefix, *probe["exec"]["command"]], env=env, cwd=cwd, capture_output=True,
                                  timeout=timeout)
            return done.returncode == 0
    except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, KeyError, ValueError):
        return False
    return True  # grpc and unknown handlers are not emulated: treat as passing


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodMonitor(threading.Thread):
    """Watches one local process: applies its readiness probe, then reports its exit."""

    def __init__(self, core: client.CoreV1Api, pod: dict[str, Any], popen: subprocess.Popen[bytes],
                 env: dict[str, str], cwd: str, stopping: threading.Event, exec_prefix: tuple[str, ...] = ()) -> None:
        super().__init__(name=f"monitor-{pod['metadata']['name']}", daemon=True)
        self.core, self.pod, self.popen, self.env, self.cwd, self.stopping = core, pod, popen, env, cwd, stopping
        self.exec_prefix = exec_prefix

    def _patch(self, ready: bool, reason: str, container_state: dict[str, Any] | None = None) -> None:
        meta, container = self.pod["metadata"], self.pod["spec"]["containers"][0]
        flag = "True" if ready else "False"
        status: dict[str, Any] = {"conditions": [
            {"type": t, "status": flag, "reason": None if ready else reason, "lastTransitionTime": _now()}
            for t in ("Ready", "ContainersReady")]}
        entry: dict[str, Any] = {"name": container["name"], "image": container.get("image", ""), "ready": ready}
        if container_state is not None:
            entry["state"] = container_state
        status["containerStatuses"] = [entry]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
        except client.exceptions.ApiException as exc:
            if exc.status != 404:  # the pod may be gone already
                raise

    def run(self) -> None:
        container = self.pod["spec"]["containers"][0]
        probe, pod_ip = container.get("readinessProbe"), self.pod["status"]["podIP"]
        if probe:
            self._patch(False, "ReadinessProbePending")
            time.sleep(float(probe.get("initialDelaySeconds", 0)))
            period = min(float(probe.get("periodSeconds", 10)), 1.0)  # faster than a kubelet: tests wait less
            while not self.stopping.is_set() and self.popen.poll() is None:
                if probe_once(probe, container, pod_ip, self.env, self.cwd, self.exec_prefix):
                    self._patch(True, "")
                    break
                self.stopping.wait(period)
        while not self.stopping.is_set() and self.popen.poll() is None:
            self.stopping.wait(0.5)
        if not self.stopping.is_set():
            code = self.popen.returncode
            code = 128 - code if code < 0 else code  # killed by signal N -> 128+N, as a kubelet reports
            self._patch(False, "ContainerExited", {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": _now()}})
