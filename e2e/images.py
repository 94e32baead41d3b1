"""kvfleet's images for tests and demos: build (or reuse) them, and a registry on loopback to publish them.

    ensure_images("dev")                # e2e/build-images.sh: seconds when warm, ~6 min cold
    with Registry() as reg:             # Debian's docker-registry (distribution 2.8) on a free 127.0.0.1 port
        ref = reg.push("localhost/kvfleet-engine:dev", "kvfleet-engine:dev")   # -> 127.0.0.1:PORT/kvfleet-engine:dev

The registry's blobs live under ``$KVFLEET_CACHE/registry`` and outlive it, so a warm push only sends
what changed (the engine image is ~3 GB of zstd layers: about a minute cold).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from e2e import imagemode, procs
from e2e.cluster import REPO

IMAGES = ("operator", "engine")


def local_ref(image: str, tag: str = "dev") -> str:
    return f"localhost/kvfleet-{image}:{tag}"


def why_no_podman() -> str | None:
    """None if podman can run containers here, else why not (the reason a test skips with)."""
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "podman is not installed and there is no apt-get to install it (install podman to run image tests)"
    return None


def ensure_images(tag: str = "dev", images: tuple[str, ...] = IMAGES) -> None:
    """Build (or reuse from podman's layer cache) the images; installs podman first if missing."""
    missing = [i for i in images if not imagemode.image_present(local_ref(i, tag))]
    if missing or not imagemode.available():
        subprocess.run([str(REPO / "e2e" / "build-images.sh"), tag], check=True, cwd=REPO,
                       env={**imagemode.podman_env(), "IMAGES": " ".join(images)})


class Registry:
    """A docker-registry process on a free loopback port, storage in the project cache."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or imagemode.cache_dir() / "registry"
        self.port = procs.free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root.parent / f"registry-{self.port}.yml"
        config.write_text(f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {self.root}}}}}\n"
                          f"http: {{addr: '{self.host}'}}\n")
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
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
