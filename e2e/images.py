"""kvfleet's images for tests and demos: build (or reuse) them, and a registry on loopback to publish them.

    ensure_images("dev")                # e2e/build-images.sh: seconds when warm, ~6 min cold
    with Registry() as reg:             # Debian's docker-registry (distribution 2.8) on a free 127.0.0.1 port
        ref = reg.push("localhost/kvfleet-engine:dev", "kvfleet-engine:dev")   # -> 127.0.0.1:PORT/kvfleet-engine:dev

The registry's blobs live under ``$KVFLEET_CACHE/registry`` and outlive it, and it listens on the same port
each time when it can: podman remembers which compressed blob it made of a layer per registry host:port,
so a warm push then neither compresses nor sends anything (seconds), while a push to a registry it does not
know recompresses every layer (the engine image: ~3 GB of zstd, about 100 s on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from e2e import imagemode, procs
from e2e.cluster import REPO
from e2e.nodes import GPU_TOLERATION

IMAGES = ("operator", "engine")


def local_ref(image: str, tag: str = "dev") -> str:
    return f"localhost/kvfleet-{image}:{tag}"


def why_no_podman() -> str | None:
    """None if podman can run containers here (or e2e/install-podman.sh can install it), else why not."""
    if shutil.which("podman") is None:
        if shutil.which("docker") is not None:
            return "image tests run containers with podman; this machine has docker only (make image uses it)"
        if shutil.which("apt-get") is None:
            return "podman is not installed and there is no apt-get to install it (install podman for image tests)"
    return None


def ensure_images(tag: str = "dev", images: tuple[str, ...] = IMAGES) -> None:
    """Build the images, or bring them up to date (~25 s when warm); installs podman first if missing.

    ``KVFLEET_IMAGES_FRESH=1`` (set by `make test` / `make image-test` right after `make image`) skips the
    rebuild when the images exist.
    """
    present = imagemode.available() and all(imagemode.image_present(local_ref(i, tag)) for i in images)
    if present and os.environ.get("KVFLEET_IMAGES_FRESH") == "1":
        return
    subprocess.run([str(REPO / "e2e" / "build-images.sh"), tag], check=True, cwd=REPO,
                   env={**imagemode.podman_env(), "IMAGES": " ".join(images)})


class Registry:
    """A docker-registry process on a free loopback port, storage in the project cache."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or imagemode.cache_dir() / "registry"
        self.port = self._stable_port()
        self.popen: subprocess.Popen[bytes] | None = None

    def _stable_port(self) -> int:
        """The port this cache's registry used last time if it is free now, else a new free one (remembered)."""
        remembered = self.root.parent / "registry.port"
        try:
            port = int(remembered.read_text())
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listener: TIME_WAIT is fine
                sock.bind(("127.0.0.1", port))
            return port
        except (OSError, ValueError):
            port = procs.free_port()
            remembered.parent.mkdir(parents=True, exist_ok=True)
            remembered.write_text(str(port))
            return port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root.parent / f"registry-{self.port}.yml"
        config.write_text(f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {self.root}}},"
                          f" delete: {{enabled: true}}}}\nhttp: {{addr: '{self.host}'}}\n")
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        # Tags are reused (tests push :e2e, the demo :demo): drop what no tag references any more, or every
        # engine rebuild would leave another ~3 GB behind. Offline, as the registry requires.
        subprocess.run([binary, "garbage-collect", "--delete-untagged", str(config)], capture_output=True, timeout=300)
        self.popen = procs.spawn([binary, "serve", str(config)], self.root.parent / f"registry-{self.port}.log",
                                 tie_to_parent=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"docker-registry exited {self.popen.returncode}; see its log") from None
                time.sleep(0.2)
        raise TimeoutError("docker-registry did not answer /v2/ in 30 s")

    def stop(self) -> None:
        if self.popen is not None:
            procs.terminate(self.popen.pid, grace_s=5, popen=self.popen)
            self.popen = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def push(self, source: str, name: str) -> str:
        """Push a local image as ``name`` (``repo:tag``); returns the registry reference."""
        ref = f"{self.host}/{name}"
        imagemode.podman("push", "-q", "--tls-verify=false", "--compression-format=zstd", source, ref, timeout=1200)
        return ref

    def drop_local(self, ref: str) -> None:
        """Forget the local name ``ref`` so that whoever runs it must pull it from the registry."""
        imagemode.podman("rmi", ref, check=False)


def chart_values(registry: str, tag: str, namespaces: list[str]) -> dict[str, Any]:
    """Helm values: both images from `registry`, the operator pod on a simulated node, run by the pod runner."""
    return {
        "image": {"repository": f"{registry}/kvfleet-operator", "tag": tag},
        "engineImage": {"repository": f"{registry}/kvfleet-engine"},
        "operator": {"watchNamespaces": namespaces, "resyncSeconds": 10},
        "podAnnotations": {"kvfleet.io/run-locally": "true"},
        "tolerations": [GPU_TOLERATION],
        # pods cannot resolve Service names here (no cluster DNS): no OTLP Service to export to
        "otlp": {"service": False},
    }


def colocated_fleet_docs(name: str) -> list[dict[str, Any]]:
    """The example variant (SmolLM2-135M, builtin), SLO classes and cache policies, and a colocated fleet of
    one engine pod that the pod runner runs."""
    docs = [d for f in ("01-modelvariants.yaml", "02-sloclasses.yaml", "03-cachepolicy.yaml")
            for d in yaml.safe_load_all((REPO / "examples" / f).read_text()) if d]
    docs = [d for d in docs if d["metadata"]["name"] != "smollm2-support"]  # needs an adapters PVC
    gpu = {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}}
    docs.append({"apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet", "metadata": {"name": name},
                 "spec": {"variants": [{"name": "smollm2-base"}], "cachePolicy": "long-context",
                          "sloClasses": ["interactive"], "defaultSloClass": "interactive",
                          "router": {"placement": {"tolerations": [GPU_TOLERATION]}},
                          "topology": {"mode": "colocated", "engine": {
                              "minReplicas": 1, "maxReplicas": 1, "maxNumSeqs": 4, "resources": gpu,
                              "placement": {"tolerations": [GPU_TOLERATION]},
                              "podAnnotations": {"kvfleet.io/run-locally": "true"}}}}})
    return docs
