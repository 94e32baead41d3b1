"""The pod runner starts a real process on the pod's IP and stops it when the pod goes."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from e2e.nodes import GPU_TOLERATION

pytestmark = pytest.mark.k8s


def web_pod(name: str) -> dict:
    return {
        "metadata": {"name": name, "annotations": {"kvfleet.io/run-locally": "true"}},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "terminationGracePeriodSeconds": 2,
            "volumes": [{"name": "site", "configMap": {"name": "site"}}],
            "containers": [{
                "name": "web", "image": "python:3.11",
                "command": ["python3", "-m", "http.server"],
                "args": ["--bind", "$(POD_IP)", "--directory", "/srv/site", "8080"],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
                "volumeMounts": [{"name": "site", "mountPath": "/srv/site"}],
            }],
        },
    }


def http_get(url: str, timeout_s: float = 30) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def port_open(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((ip, port)) == 0


def test_pod_process_serves_on_its_pod_ip_and_stops_with_the_pod(cluster, podrunner, namespace):
    cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "site"},
                                                          "data": {"hello.txt": "served from a ConfigMap\n"}})
    cluster.core.create_namespaced_pod(namespace, web_pod("web"))
    deadline = time.monotonic() + 30
    while not (ip := cluster.core.read_namespaced_pod("web", namespace).status.pod_ip):
        assert time.monotonic() < deadline, "pod got no IP"
        time.sleep(0.2)
    assert ip.startswith("127.") and ip != "127.0.0.1"

    assert http_get(f"http://{ip}:8080/hello.txt") == b"served from a ConfigMap\n"
    local = podrunner.find(namespace, "web")
    assert local is not None and local.popen.poll() is None
    assert "127." in local.log.read_text()

    cluster.core.delete_namespaced_pod("web", namespace)
    deadline = time.monotonic() + 20
    while local.popen.poll() is None or port_open(ip, 8080):
        assert time.monotonic() < deadline, "process still running after pod deletion"
        time.sleep(0.2)
    assert podrunner.find(namespace, "web") is None


def test_pods_without_the_annotation_are_left_alone(cluster, podrunner, namespace):
    pod = web_pod("plain")
    del pod["metadata"]["annotations"]
    pod["spec"]["volumes"] = []
    pod["spec"]["containers"][0]["volumeMounts"] = []
    cluster.core.create_namespaced_pod(namespace, pod)
    deadline = time.monotonic() + 30
    while cluster.core.read_namespaced_pod("plain", namespace).status.phase != "Running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)
    assert podrunner.find(namespace, "plain") is None


def test_pod_process_talks_to_the_api_as_its_service_account(cluster, podrunner, namespace):
    script = ("from kubernetes import client, config\n"
              "config.load_kube_config()\n"
              "try:\n"
              "    client.CoreV1Api().list_namespaced_pod('kube-system')\n"
              "    print('ALLOWED')\n"
              "except client.exceptions.ApiException as exc:\n"
              "    print('STATUS', exc.status, exc.body)\n")
    pod = web_pod("whoami")
    pod["spec"]["volumes"] = []
    pod["spec"]["containers"][0].update(command=["python3", "-c", script], args=[], volumeMounts=[])
    cluster.core.create_namespaced_pod(namespace, pod)
    deadline = time.monotonic() + 30
    while (local := podrunner.find(namespace, "whoami")) is None or local.popen is None or local.popen.poll() is None:
        assert time.monotonic() < deadline, "process did not run to completion"
        time.sleep(0.2)
    log = local.log.read_text()
    assert "STATUS 403" in log and f"system:serviceaccount:{namespace}:default" in log, log

    def terminated():
        status = cluster.core.read_namespaced_pod("whoami", namespace).status
        state = status.container_statuses[0].state
        return state.terminated if state and state.terminated else None

    deadline = time.monotonic() + 10
    while (done := terminated()) is None:
        assert time.monotonic() < deadline, "exit not reported in pod status"
        time.sleep(0.2)
    assert done.exit_code == 0 and done.reason == "Completed"


def pod_ready(cluster, namespace: str, name: str) -> bool:
    conds = cluster.core.read_namespaced_pod(name, namespace).status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conds)


def test_readiness_probe_gates_the_ready_condition(cluster, podrunner, namespace):
    pod = web_pod("slow")
    pod["spec"]["volumes"] = []
    container = pod["spec"]["containers"][0]
    container.update(command=["sh", "-c", "sleep 3 && exec python3 -m http.server --bind $(POD_IP) 8080"],
                     args=[], volumeMounts=[], ports=[{"name": "http", "containerPort": 8080}],
                     readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1})
    cluster.core.create_namespaced_pod(namespace, pod)
    deadline = time.monotonic() + 20
    while podrunner.find(namespace, "slow") is None:
        assert time.monotonic() < deadline, "pod runner did not start the pod"
        time.sleep(0.1)
    time.sleep(1)
    assert not pod_ready(cluster, namespace, "slow"), "Ready before the process listens"
    deadline = time.monotonic() + 30
    while not pod_ready(cluster, namespace, "slow"):
        assert time.monotonic() < deadline, "readiness probe never passed"
        time.sleep(0.2)
    ip = cluster.core.read_namespaced_pod("slow", namespace).status.pod_ip
    assert http_get(f"http://{ip}:8080/", timeout_s=2)


def test_a_pvc_on_a_hostpath_pv_mounts_the_host_directory_and_configs_see_it(cluster, podrunner, namespace, tmp_path):
    """The LoRA example's shape: a PVC (bound to a hostPath PV) mounted with a subPath, and a ConfigMap file
    naming the mountPath; the process reads the host file through the path its config names."""
    (tmp_path / "support-v3").mkdir()
    (tmp_path / "support-v3" / "adapter.txt").write_text("adapter bytes\n")
    pv = f"pv-{namespace}"
    cluster.core.create_persistent_volume({
        "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "hostPath": {"path": str(tmp_path)}, "claimRef": {"namespace": namespace, "name": "adapters"}}})
    try:
        cluster.core.create_namespaced_persistent_volume_claim(namespace, {
            "metadata": {"name": "adapters"},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        # a config file naming the mount: the process serves the file that path points at
        cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "site"},
                                                              "data": {"where.txt": "/models/support/adapter.txt\n"}})
        pod = web_pod("pvc")
        c = pod["spec"]["containers"][0]
        c["command"] = ["python3", "-c", "import http.server, os, pathlib, socketserver\n"
                        "src = pathlib.Path(pathlib.Path('/srv/site/where.txt').read_text().strip())\n"
                        "class H(http.server.BaseHTTPRequestHandler):\n"
                        "    def do_GET(self):\n"
                        "        self.send_response(200); self.end_headers(); self.wfile.write(src.read_bytes())\n"
                        "socketserver.TCPServer((os.environ['POD_IP'], 8080), H).serve_forever()\n"]
        c["args"] = []
        c["volumeMounts"].append({"name": "adapters", "mountPath": "/models/support", "subPath": "support-v3",
                                  "readOnly": True})
        pod["spec"]["volumes"].append({"name": "adapters", "persistentVolumeClaim": {"claimName": "adapters"}})
        cluster.core.create_namespaced_pod(namespace, pod)
        deadline = time.monotonic() + 30
        while not (ip := cluster.core.read_namespaced_pod("pvc", namespace).status.pod_ip):
            assert time.monotonic() < deadline, "no pod IP"
            time.sleep(0.2)
        assert http_get(f"http://{ip}:8080/") == b"adapter bytes\n"
    finally:
        cluster.core.delete_persistent_volume(pv)
