"""The pod runner's image mode: run a pod's container from its image with podman, bound to the pod IP.

A KWOK pod has no kubelet. In image mode (``PodRunner(images=True)``, or ``KVFLEET_PODRUNNER_IMAGES=1``)
the runner starts an opted-in pod's first container with ``podman run`` when its image is in local
podman storage (or can be pulled from a registry on loopback), mapping what a kubelet would:

  * ``command`` replaces the image's ENTRYPOINT and ``args`` its CMD; ``workingDir`` -> ``--workdir``;
  * ``env`` (resolved by the runner) via an env file; ``KUBERNETES_SERVICE_HOST``/``_PORT`` name the real
    API server, so in-cluster clients use the ServiceAccount volume the API server's admission added;
  * every volume mount -> ``-v LOCAL:MOUNTPATH[:ro]`` (the runner writes the files: configMap, secret,
    projected token, emptyDir with mode 0777 as a kubelet makes it);
  * ``securityContext``: runAsUser/runAsGroup (container over pod) -> ``--user``, fsGroup ->
    ``--group-add``, runAsNonRoot refuses a root user (as a kubelet does), readOnlyRootFilesystem ->
    ``--read-only`` WITHOUT podman's extra tmpfs mounts (so a missing volume shows), capabilities ->
    ``--cap-drop``/``--cap-add``, allowPrivilegeEscalation: false -> no-new-privileges;
  * network: the host's (``--network=host``); a pod has its own network namespace where ``0.0.0.0`` means
    its own IP, so ``0.0.0.0`` in args and env becomes the pod IP (two pods may listen on one port).

Not emulated: resource limits, other containers, init containers, restarts, Services/DNS.
Podman's config (runc, cgroupfs, lower ulimits on this kind of host) comes from ``e2e/install-podman.sh``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

ENV_FLAG = "KVFLEET_PODRUNNER_IMAGES"
LABEL = "kvfleet.io/podrunner"


def cache_dir() -> Path:
    return Path(os.environ.get("KVFLEET_CACHE") or Path.home() / ".cache" / "kvfleet")


def podman_env() -> dict[str, str]:
    """The environment podman runs with: the project's containers.conf and storage (see install-podman.sh)."""
    conf = cache_dir() / "containers"
    return {**os.environ, "CONTAINERS_CONF": str(conf / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf")}


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def available() -> bool:
    """podman is installed and configured by e2e/install-podman.sh."""
    return shutil.which("podman") is not None and (cache_dir() / "containers" / "storage.conf").is_file()


def loopback_registry(image: str) -> bool:
    """Whether the image's registry is on this machine (127.x.y.z:port or localhost:port)."""
    host = image.split("/", 1)[0] if "/" in image else ""
    return bool(re.fullmatch(r"(127\.\d+\.\d+\.\d+|localhost):\d+", host))


def image_present(image: str) -> bool:
    return available() and podman("image", "exists", image, check=False).returncode == 0


def ensure_image(image: str) -> bool:
    """True if the image is in local storage, pulling it first from a loopback registry (plain HTTP)."""
    if image_present(image):
        return True
    if available() and loopback_registry(image):
        return podman("pull", "-q", "--tls-verify=false", image, check=False).returncode == 0
    return False


def image_config(image: str) -> dict[str, Any]:
    """The image's OCI config (User, Env, Entrypoint, Cmd, Labels, ...)."""
    out = podman("image", "inspect", "--format", "{{json .Config}}", image).stdout
    return json.loads(out) or {}  # type: ignore[no-any-return]


def _user(pod: dict[str, Any], container: dict[str, Any], image: str) -> tuple[str | None, list[str]]:
    """(--user value or None for the image's, extra groups); raises like a kubelet on runAsNonRoot + root."""
    psc, csc = pod["spec"].get("securityContext") or {}, container.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
    effective = str(uid) if uid is not None else (image_config(image).get("User") or "0")
    if non_root and effective.split(":")[0] in ("0", "root", ""):
        raise PermissionError(f"runAsNonRoot and the image {image} runs as {effective!r}: refused, as a kubelet does")
    if non_root and not effective.split(":")[0].isdigit():
        raise PermissionError(f"runAsNonRoot and a non-numeric image user {effective!r}: a kubelet cannot verify it")
    user = None if uid is None else (f"{uid}:{gid}" if gid is not None else str(uid))
    groups = [str(psc["fsGroup"])] if psc.get("fsGroup") is not None else []
    groups += [str(g) for g in psc.get("supplementalGroups") or []]
    return user, groups


def bind_pod_ip(text: str, pod_ip: str) -> str:
    """``0.0.0.0`` (all of the pod's addresses) -> the pod IP: host networking shares one namespace."""
    return re.sub(r"(?<![\d.])0\.0\.0\.0(?![\d.])", pod_ip, text)


def run_argv(pod: dict[str, Any], container: dict[str, Any], *, name: str, env: dict[str, str],
             argv: tuple[list[str], list[str]], mounts: list[tuple[Path, str, bool]], env_file: Path,
             server: tuple[str, int], label: str) -> list[str]:
    """The ``podman run`` command line for one container (attached: its exit code is podman's)."""
    image = container["image"]
    pod_ip = pod["status"]["podIP"]
    csc = container.get("securityContext") or {}
    user, groups = _user(pod, container, image)
    env = {k: bind_pod_ip(v, pod_ip) for k, v in env.items()}
    env.update(KUBERNETES_SERVICE_HOST=server[0], KUBERNETES_SERVICE_PORT=str(server[1]), POD_IP=pod_ip)
    bad = [k for k, v in env.items() if "\n" in v]
    if bad:
        raise ValueError(f"env values with newlines cannot go through an env file: {bad}")
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    env_file.chmod(0o600)
    cmd = ["podman", "run", "--rm", "--name", name, "--label", f"{LABEL}={label}", "--pull=never",
           "--network=host", "--env-file", str(env_file),
           "--stop-timeout", str(int(pod["spec"].get("terminationGracePeriodSeconds") or 30))]
    if user:
        cmd += ["--user", user]
    for g in groups:
        cmd += ["--group-add", g]
    if csc.get("readOnlyRootFilesystem"):
        cmd += ["--read-only", "--read-only-tmpfs=false"]
    caps = csc.get("capabilities") or {}
    cmd += [f"--cap-drop={c.lower()}" for c in caps.get("drop") or []]
    cmd += [f"--cap-add={c.lower()}" for c in caps.get("add") or []]
    if csc.get("allowPrivilegeEscalation") is False:
        cmd += ["--security-opt=no-new-privileges"]
    for local, path, read_only in mounts:
        cmd += ["-v", f"{local}:{path}" + (":ro" if read_only else "")]
    if container.get("workingDir"):
        cmd += ["--workdir", container["workingDir"]]
    command, args = ([bind_pod_ip(a, pod_ip) for a in part] for part in argv)
    if command:
        cmd += ["--entrypoint", json.dumps(command)]
    return cmd + [image, *args]


def remove(name: str) -> None:
    """Force-remove a container (it may already be gone)."""
    podman("rm", "-f", "-t", "0", name, check=False, timeout=60)


def remove_labelled(label: str) -> None:
    """Remove containers an earlier runner with this label left behind (it was killed)."""
    if available():
        ids = podman("ps", "-aq", "--filter", f"label={LABEL}={label}", check=False).stdout.split()
        if ids:
            podman("rm", "-f", "-t", "0", *ids, check=False, timeout=120)
