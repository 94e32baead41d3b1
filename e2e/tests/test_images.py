"""The real images: built here without Docker, run as containers, and installed by Helm from a registry.

* the operator image: non-root, no torch, small; runs with a read-only root and no capabilities;
* the engine image: serves SmolLM2-135M (materialised into its cache volume at first start) to the
  `openai` SDK, with a read-only root, as its non-root user;
* the chart from a loopback registry on the real local control plane: the operator runs IN A POD from its
  image (the pod runner's image mode, pulling from the registry), turns Ready, reconciles a colocated
  fleet, and the engine pod (engine image, pulled too) answers the `openai` SDK on its pod IP.

Images are built by e2e/build-images.sh (`make image`), reused from podman's layer cache when warm.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from e2e import imagemode
from e2e.cluster import REPO
from e2e.harness import answers, serving_pod_ips, wait_for
from e2e.images import Registry, chart_values, colocated_fleet_docs, ensure_images, local_ref, why_no_podman
from e2e.procs import free_port

pytestmark = [pytest.mark.images, pytest.mark.slow]
OPERATOR, ENGINE = local_ref("operator"), local_ref("engine")
HARDENED = ["--read-only", "--read-only-tmpfs=false", "--cap-drop=all", "--security-opt=no-new-privileges"]


def _images(*names: str) -> None:
    if reason := why_no_podman():
        pytest.skip(reason)
    ensure_images("dev", names)


@pytest.fixture(scope="session")
def operator_image() -> None:
    _images("operator")


@pytest.fixture(scope="session")
def images() -> None:
    _images("operator", "engine")


def dockerfile_label(target: str, key: str) -> str:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
    return re.search(rf'{re.escape(key)}="([^"]*)"', stage).group(1)  # type: ignore[union-attr]


def run(*args: str, timeout: float = 120) -> str:
    return imagemode.podman("run", "--rm", "--network=host", *args, timeout=timeout).stdout


def test_operator_image_is_small_non_root_read_only_and_without_torch(operator_image):
    config = imagemode.image_config(OPERATOR)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["kvfleet"]
    assert "PYTHONSAFEPATH=1" in config["Env"]
    assert config["Labels"]["io.kvfleet.writable-paths"] == dockerfile_label("operator", "io.kvfleet.writable-paths")
    size = int(imagemode.podman("image", "inspect", "--format", "{{.Size}}", OPERATOR).stdout)
    assert size < 300e6, f"operator image is {size / 1e6:.0f} MB"
    out = run(*HARDENED, "--entrypoint", "python", OPERATOR, "-c",
              "import os, importlib.util as u, kvfleet.operator.main; "
              "print(os.getuid(), os.getgid(), u.find_spec('torch') is None, os.access('/opt', os.W_OK))")
    assert out.split() == ["10001", "10001", "True", "False"]
    assert "kvfleet operator" in run(*HARDENED, OPERATOR, "operator", "--help")


def test_engine_image_serves_smollm2_to_the_openai_sdk_from_a_read_only_root(images, tmp_path: Path):
    config = imagemode.image_config(ENGINE)
    assert config["User"] == "10001:10001"
    writable = config["Labels"]["io.kvfleet.writable-paths"].split()
    assert writable == dockerfile_label("engine", "io.kvfleet.writable-paths").split()
    volumes = []
    for path in writable:  # what the pods mount as emptyDir volumes
        local = tmp_path / path.strip("/").replace("/", "_")
        local.mkdir()
        local.chmod(0o777)
        volumes += ["-v", f"{local}:{path}"]
    port, name = free_port(), f"kvfleet-engine-smoke-{free_port()}"
    t0 = time.monotonic()
    imagemode.podman("run", "-d", "--name", name, "--network=host", *HARDENED, *volumes, ENGINE,
                     "serve", "--model", "smollm2", "--host", "127.0.0.1", "--port", str(port))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        wait_for("the engine container to serve", lambda: answers(f"http://127.0.0.1:{port}/health"), timeout=180)
        ready_s = time.monotonic() - t0
        reply = client.chat.completions.create(model="smollm2", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        print(f"engine container: serving {ready_s:.1f}s after start (GGUF -> HF conversion included)")
    finally:
        logs = imagemode.podman("logs", name, check=False).stdout
        imagemode.remove(name)
    assert "Traceback" not in logs, logs


# ---- Helm from a loopback registry, pods in image mode -----------------------------------------------------
@pytest.fixture
def registry(images) -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


@pytest.mark.k8s
def test_helm_installs_the_operator_image_from_a_registry_and_its_fleet_serves(cluster, podrunner, registry,
                                                                                namespace, tmp_path: Path):
    if cluster.local is None:
        pytest.skip("image mode needs the local control plane (pod IPs on loopback)")
    tag = "e2e"  # reused: the registry drops the previous run's layers at its next start
    t0 = time.monotonic()
    operator_ref = registry.push(OPERATOR, f"kvfleet-operator:{tag}")
    engine_ref = registry.push(ENGINE, f"kvfleet-engine:{tag}")
    print(f"pushed both images to {registry.host} in {time.monotonic() - t0:.1f}s")
    release, system_ns = f"kvf-{namespace[2:]}", f"{namespace}-sys"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(registry.host, tag, [namespace])))
    podrunner.images = True  # pods of images in local storage or on a loopback registry run with podman
    try:
        cluster.helm("install", release, str(REPO / "charts" / "kvfleet"), "-n", system_ns, "--create-namespace",
                     "-f", str(values))

        def operator_pod() -> dict | None:
            items = json.loads(cluster.kubectl("get", "pods", "-n", system_ns, "-o", "json").stdout)["items"]
            ready = [p for p in items if any(c["type"] == "Ready" and c["status"] == "True"
                                             for c in p["status"].get("conditions", []))]
            # KWOK reports Ready on its own: the operator's /healthz answering is what counts
            return next((p for p in ready if serving_pod_ips([p], port=8080, path="/healthz")), None)

        pod = wait_for("the operator pod Ready and answering /healthz", operator_pod, timeout=180)
        assert pod["spec"]["containers"][0]["image"] == operator_ref
        local = wait_for("the runner's container of the operator pod",
                         lambda: podrunner.find(system_ns, pod["metadata"]["name"]), timeout=30)
        assert local.container, "the operator pod ran as a process, not from its image"
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(colocated_fleet_docs("colo")))
        wait_for("fleet colo Available", lambda: any(
            c["type"] == "Available" and c["status"] == "True" for c in json.loads(cluster.kubectl(
                "get", "fleet", "colo", "-n", namespace, "-o", "json").stdout).get("status", {}).get("conditions", [])),
            timeout=300)
        pods = lambda: json.loads(cluster.kubectl(  # noqa: E731
            "get", "pods", "-n", namespace, "-l", "kvfleet.io/fleet=colo,kvfleet.io/role=engine", "-o", "json").stdout)
        ips = wait_for("the engine pod serving", lambda: serving_pod_ips(pods()["items"]), timeout=300)
        engine_pod = pods()["items"][0]
        assert engine_pod["spec"]["containers"][0]["image"] == engine_ref
        assert podrunner.find(namespace, engine_pod["metadata"]["name"]).container
        client = openai.OpenAI(base_url=f"http://{ips[0]}:8080/v1", api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="smollm2", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        cluster.kubectl("delete", "fleet", "colo", "-n", namespace, "--wait=true", timeout=120)
    finally:
        podrunner.images = False
        cluster.helm("uninstall", release, "-n", system_ns, "--wait", check=False)
        cluster.kubectl("delete", "namespace", system_ns, "--wait=false", check=False)
        for ref in (operator_ref, engine_ref):
            imagemode.podman("rmi", ref, check=False)  # the names the runner pulled; the layers stay
