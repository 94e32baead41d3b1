"""Run opted-in pods of a KWOK cluster as real local processes on their pod IPs.

KWOK pods are Running only on paper. For pods annotated ``kvfleet.io/run-locally: "true"``
this runner starts the first container's ``command`` + ``args`` on this machine once
KWOK has given the pod an IP (a loopback address such as ``127.1.0.7`` that the
process can bind), and stops it (SIGTERM, then SIGKILL after the pod's grace period,
at most 10 s) when the pod is deleted or terminating.

What it emulates:
  * ``env`` with ``value``, ``$(VAR)`` expansion, ``valueFrom.fieldRef`` (``metadata.name``,
    ``metadata.namespace``, ``metadata.uid``, ``metadata.labels['k']``, ``metadata.annotations['k']``,
    ``spec.nodeName``, ``spec.serviceAccountName``, ``status.podIP``, ``status.hostIP``),
    ``configMapKeyRef`` / ``secretKeyRef``, and ``envFrom`` ConfigMaps/Secrets;
  * volume mounts of ``configMap``, ``secret``, ``emptyDir`` and ``projected`` (configMap,
    secret, downwardAPI namespace, serviceAccountToken) volumes: their files are written
    to ``<workdir>/<pod>/volumes/<volume>`` and every occurrence of the ``mountPath`` in
    command, args, env values and ``workingDir`` is rewritten to that local path
    (``subPath`` is honoured); ``hostPath`` volumes and ``persistentVolumeClaim`` volumes bound
    to a ``hostPath`` PersistentVolume mount that host directory itself. A process has no mount
    namespace, so mountPaths inside the written configMap/secret files are rewritten too (a
    config naming ``/models/x`` reads the local directory mounted there);
  * API access: ``KUBECONFIG`` points at a per-pod kubeconfig holding a token for the
    pod's ServiceAccount (TokenRequest bound to the pod), so RBAC applies as in a real
    pod. ``KUBERNETES_SERVICE_HOST`` is not set: clients must fall back from in-cluster
    config to ``KUBECONFIG`` (kopf and ``kubernetes.config`` helpers do);
  * ``POD_IP`` and ``KVFLEET_POD_DIR`` are always set; the runner's own environment is the
    base (``PATH`` first lists the directory of the runner's Python);
  * ``readinessProbe`` (httpGet, tcpSocket, exec) gates the pod's Ready condition, and a
    process that exits on its own is reported as a terminated container
    (``e2e/podstatus.py``).

Image mode (``images=True`` or ``KVFLEET_PODRUNNER_IMAGES=1``): a pod whose image is in local podman
storage, or on a loopback registry, runs from that image with podman instead (``e2e/imagemode.py``:
host network, volumes, env, ServiceAccount, securityContext mapped); other pods still run as processes.

What process mode does not emulate: images (the command must exist on this machine; a container
without ``command`` is not run), other containers of the pod, init containers, other
volume types, liveness/startup probes, resource limits, restarts (an exited process
stays exited; its exit code is logged and reported),
``securityContext``, network isolation and Services (talk to pod IPs directly).

Each pod's output goes to ``<workdir>/<namespace>_<name>/<container>.log``.

    python -m e2e.podrunner --kubeconfig K --workdir DIR [--namespace NS]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from e2e import imagemode, procs
from e2e.nodes import api_client
from e2e.podstatus import PodMonitor

ANNOTATION = "kvfleet.io/run-locally"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known vars are replaced, ``$$`` escapes, unknown stay literal."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


def field_ref(pod: dict[str, Any], path: str) -> str:
    """Resolve a downward-API ``fieldPath`` against a pod dict."""
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return str((pod["metadata"].get(m.group(1)) or {}).get(m.group(2), ""))
    node: Any = pod
    for part in path.split("."):
        node = node.get(part, "") if isinstance(node, dict) else ""
    return str(node)


@dataclass
class LocalPod:
    """A pod's local process and where its files live."""

    namespace: str
    name: str
    uid: str
    dir: Path
    log: Path
    popen: subprocess.Popen[bytes] | None
    grace_s: float
    stopping: threading.Event = field(default_factory=threading.Event)
    container: str | None = None  # the podman container's name in image mode


class PodRunner:
    """Watches pods and keeps one local process per opted-in, IP-assigned, live pod."""

    def __init__(self, kubeconfig: Path | str, workdir: Path | str, namespace: str | None = None,
                 images: bool | None = None) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.images = os.environ.get(imagemode.ENV_FLAG) == "1" if images is None else images
        self.pods: dict[str, LocalPod] = {}
        self._api = api_client(self.kubeconfig)
        self._core = client.CoreV1Api(self._api)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        kc = yaml.safe_load(self.kubeconfig.read_text())
        context = next(c["context"] for c in kc["contexts"] if c["name"] == kc["current-context"])
        self._server = next(c["cluster"] for c in kc["clusters"] if c["name"] == context["cluster"])

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> PodRunner:
        """Watch in a background thread; returns self."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.images:
            imagemode.remove_labelled(str(self.workdir.resolve()))  # what a killed runner left behind
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching and stop every local process."""
        self._stopping.set()
        with self._lock:
            for uid in list(self.pods):
                self._stop_pod(uid)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._api.close()

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def find(self, namespace: str, name: str) -> LocalPod | None:
        """The running local pod with this name, if any."""
        with self._lock:
            return next((p for p in self.pods.values() if (p.namespace, p.name) == (namespace, name)), None)

    # ---- watch loop --------------------------------------------------------------------------
    def _list(self, **kw: Any) -> Any:
        if self.namespace:
            return self._core.list_namespaced_pod(self.namespace, **kw)
        return self._core.list_pod_for_all_namespaces(**kw)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                listed = self._api.sanitize_for_serialization(self._list())
                seen = {p["metadata"]["uid"] for p in listed["items"]}
                with self._lock:
                    for uid in set(self.pods) - seen:
                        self._stop_pod(uid)
                for pod in listed["items"]:
                    self._reconcile(pod, deleted=False)
                stream = watch.Watch().stream(self._list, resource_version=listed["metadata"]["resourceVersion"],
                                              timeout_seconds=20)
                for event in stream:
                    if self._stopping.is_set():
                        return
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: relist
                    self._reconcile(obj, deleted=event["type"] == "DELETED")
            except Exception as exc:  # noqa: BLE001 - keep watching through API hiccups
                if not self._stopping.is_set():
                    print(f"[podrunner] watch error: {exc!r}; relisting", file=sys.stderr, flush=True)
                    time.sleep(1)

    def _reconcile(self, pod: dict[str, Any], deleted: bool) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        if (meta.get("annotations") or {}).get(ANNOTATION) != "true":
            return
        uid = meta["uid"]
        with self._lock:
            gone = deleted or meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed")
            if gone:
                self._stop_pod(uid)
            elif status.get("podIP") and uid not in self.pods and not self._stopping.is_set():
                self._start_pod(pod)

    # ---- one pod -----------------------------------------------------------------------------
    def _start_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        pod_dir = self.workdir / f"{meta['namespace']}_{meta['name']}"
        shutil.rmtree(pod_dir, ignore_errors=True)
        pod_dir.mkdir(parents=True)
        log = pod_dir / f"{container['name']}.log"
        local = LocalPod(meta["namespace"], meta["name"], meta["uid"], pod_dir, log, None,
                         min(float(spec.get("terminationGracePeriodSeconds") or 30), 10.0))
        self.pods[meta["uid"]] = local
        try:
            mounts = self._materialize_volumes(pod, container, pod_dir)
            if self.images and imagemode.ensure_image(container.get("image", "")):
                self._start_container(pod, container, local, mounts)
                return
            env = self._environment(pod, container, pod_dir, mounts)
            argv = [self._rewrite(expand(a, env), mounts) for a in container.get("command") or []]
            argv += [self._rewrite(expand(a, env), mounts) for a in container.get("args") or []]
            if not container.get("command"):
                raise ValueError("container has no command; images are not emulated")
            cwd = Path(self._rewrite(container.get("workingDir", ""), mounts) or pod_dir)
            with open(log, "a") as out:
                out.write(f"[podrunner] starting on {pod['status']['podIP']}: {argv!r}\n")
            cwd = cwd if cwd.is_dir() else pod_dir
            local.popen = procs.spawn(argv, log, env=env, cwd=cwd, tie_to_parent=True)
            PodMonitor(self._core, pod, local.popen, env, str(cwd), local.stopping).start()
        except Exception as exc:  # noqa: BLE001 - a bad pod must not stop the runner
            with open(log, "a") as out:
                out.write(f"[podrunner] cannot run pod: {exc!r}\n")

    def _start_container(self, pod: dict[str, Any], container: dict[str, Any], local: LocalPod,
                         mounts: dict[str, Path]) -> None:
        """Image mode: ``podman run`` the container (attached, so the Popen is the container's lifetime)."""
        env = self._environment(pod, container, local.dir, {}, image=True)
        argv = ([expand(a, env) for a in container.get("command") or []],
                [expand(a, env) for a in container.get("args") or []])
        volume_mounts = [(mounts[vm["mountPath"]], vm["mountPath"], bool(vm.get("readOnly")))
                         for vm in container.get("volumeMounts") or []]
        local.container = f"kvfleet-{pod['metadata']['namespace']}-{pod['metadata']['name']}"[:60] + \
            f"-{local.uid[:8]}"
        port = int(self._server["server"].rsplit(":", 1)[1])
        cmd = imagemode.run_argv(pod, container, name=local.container, env=env, argv=argv, mounts=volume_mounts,
                                 env_file=local.dir / "env", server=("127.0.0.1", port),
                                 label=str(self.workdir.resolve()))
        with open(local.log, "a") as out:
            out.write(f"[podrunner] starting image {container['image']} on {pod['status']['podIP']}: {cmd!r}\n")
        local.popen = procs.spawn(cmd, local.log, env=imagemode.podman_env(), cwd=local.dir, tie_to_parent=True)
        PodMonitor(self._core, pod, local.popen, imagemode.podman_env(), str(local.dir), local.stopping,
                   exec_prefix=("podman", "exec", local.container)).start()

    def _stop_pod(self, uid: str) -> None:
        local = self.pods.pop(uid, None)
        if local is None or local.popen is None:
            return
        local.stopping.set()
        procs.terminate(local.popen.pid, grace_s=local.grace_s, popen=local.popen)
        if local.container:
            imagemode.remove(local.container)
        with open(local.log, "a") as out:
            out.write(f"[podrunner] stopped, exit code {local.popen.poll()}\n")

    @staticmethod
    def _rewrite(text: str, mounts: dict[str, Path]) -> str:
        """Replace each mountPath that starts a path in `text` by its local directory, in ONE pass.

        One pass matters: a local directory may itself contain a mountPath (e.g. `/tmp`).
        """
        if not mounts:
            return text
        local = {m.rstrip("/") or "/": str(p) for m, p in mounts.items()}
        alternatives = "|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
        pattern = r"(?<![\w./-])(" + alternatives + r")(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda m: local[m.group(1)], text)

    def _read_map(self, kind: str, namespace: str, name: str, optional: bool = False) -> dict[str, str]:
        try:
            if kind == "configMap":
                cm = self._core.read_namespaced_config_map(name, namespace)
                return dict(cm.data or {})
            secret = self._core.read_namespaced_secret(name, namespace)
            return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise

    def _token(self, pod: dict[str, Any], seconds: int = 86400, audience: str | None = None) -> str:
        meta = pod["metadata"]
        body = {"spec": {"expirationSeconds": seconds, "audiences": [audience] if audience else None,
                         "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}}}
        sa = pod["spec"].get("serviceAccountName") or "default"
        return str(self._core.create_namespaced_service_account_token(sa, meta["namespace"], body).status.token)

    def _write_files(self, target: Path, files: dict[str, str], items: list[dict[str, str]] | None) -> None:
        wanted = {i["key"]: i["path"] for i in items} if items else {k: k for k in files}
        for key, rel in wanted.items():
            if key in files:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_text(files[key])

    def _materialize_volumes(self, pod: dict[str, Any], container: dict[str, Any], pod_dir: Path) -> dict[str, Path]:
        """Write each mounted volume's files locally; returns mountPath -> local path."""
        ns = pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        written: list[Path] = []  # configMap/secret volumes: their files' mountPaths are rewritten below
        for vm in container.get("volumeMounts") or []:
            vol, target = volumes.get(vm["name"], {}), pod_dir / "volumes" / vm["name"]
            host = self._host_dir(ns, vol)
            if host is not None:
                mounts[vm["mountPath"]] = host / vm["subPath"] if vm.get("subPath") else host
                continue
            if not target.exists():
                if "configMap" in vol or "secret" in vol or "projected" in vol:
                    written.append(target)  # fresh: rewrite once (a second pass could rewrite a local path)
                target.mkdir(parents=True)
                if "emptyDir" in vol:
                    target.chmod(0o777)  # as a kubelet makes it: writable by the pod's (non-root) user
                if "configMap" in vol or "secret" in vol:
                    kind = "configMap" if "configMap" in vol else "secret"
                    src = vol[kind]
                    name = src.get("name") or src.get("secretName")
                    self._write_files(target, self._read_map(kind, ns, name, src.get("optional", False)), src.get("items"))
                for source in (vol.get("projected") or {}).get("sources") or []:
                    if "serviceAccountToken" in source:
                        t = source["serviceAccountToken"]
                        (target / t["path"]).write_text(self._token(pod, max(int(t.get("expirationSeconds", 3607)), 86400),
                                                                    t.get("audience")))
                    for kind in ("configMap", "secret"):
                        if kind in source:
                            src = source[kind]
                            self._write_files(target, self._read_map(kind, ns, src["name"], src.get("optional", False)),
                                              src.get("items"))
                    for item in (source.get("downwardAPI") or {}).get("items") or []:
                        if "fieldRef" in item:
                            (target / item["path"]).write_text(field_ref(pod, item["fieldRef"]["fieldPath"]))
            mounts[vm["mountPath"]] = target / vm["subPath"] if vm.get("subPath") else target
        for target in written:
            for f in (p for p in target.rglob("*") if p.is_file()):
                text = f.read_text(errors="replace")
                if (new := self._rewrite(text, mounts)) != text:
                    f.write_text(new)
        return mounts

    def _host_dir(self, namespace: str, vol: dict[str, Any]) -> Path | None:
        """The host directory behind a hostPath volume or a PVC bound to a hostPath PV (None: another kind)."""
        if "hostPath" in vol:
            return Path(vol["hostPath"]["path"])
        claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
        if not claim:
            return None
        pvc = self._core.read_namespaced_persistent_volume_claim(claim, namespace)
        if not pvc.spec.volume_name:
            raise RuntimeError(f"PVC {namespace}/{claim} is not bound (the pod would wait for it)")
        pv = self._core.read_persistent_volume(pvc.spec.volume_name)
        if pv.spec.host_path is None:
            raise RuntimeError(f"PV {pv.metadata.name} is not a hostPath volume: this runner cannot mount it")
        return Path(pv.spec.host_path.path)

    def _environment(self, pod: dict[str, Any], container: dict[str, Any], pod_dir: Path,
                     mounts: dict[str, Path], image: bool = False) -> dict[str, str]:
        """The container's environment. A process gets the runner's own as its base, a KUBECONFIG and
        local paths for mountPaths; a container (``image``) only what the pod declares (the image has the rest)."""
        ns = pod["metadata"]["namespace"]
        env = {} if image else dict(os.environ)
        if not image:
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            env.pop(var, None)
        env.update(POD_IP=pod["status"]["podIP"])
        if not image:
            env["KVFLEET_POD_DIR"] = str(pod_dir)
        if not image and pod["spec"].get("automountServiceAccountToken") is not False:
            kubeconfig = pod_dir / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "pod",
                "clusters": [{"name": "local", "cluster": self._server}],
                "users": [{"name": "sa", "user": {"token": self._token(pod)}}],
                "contexts": [{"name": "pod", "context": {"cluster": "local", "user": "sa", "namespace": ns}}],
            }))
            env["KUBECONFIG"] = str(kubeconfig)
        defined: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            kind = "configMap" if "configMapRef" in src else "secret"
            ref = src.get("configMapRef") or src.get("secretRef")
            for k, v in self._read_map(kind, ns, ref["name"], ref.get("optional", False)).items():
                defined[src.get("prefix", "") + k] = v
        for var in container.get("env") or []:
            if "value" in var or "valueFrom" not in var:
                value = expand(var.get("value", ""), defined)
            else:
                vf = var["valueFrom"]
                if "fieldRef" in vf:
                    value = field_ref(pod, vf["fieldRef"]["fieldPath"])
                elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                    kind = "configMap" if "configMapKeyRef" in vf else "secret"
                    ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
                    value = self._read_map(kind, ns, ref["name"], ref.get("optional", False)).get(ref["key"], "")
                else:
                    raise ValueError(f"env {var['name']}: unsupported valueFrom {sorted(vf)}")
            defined[var["name"]] = self._rewrite(value, mounts)
        env.update(defined)
        return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.podrunner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--namespace", default=None, help="only this namespace (default: all)")
    args = parser.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with PodRunner(args.kubeconfig, args.workdir, args.namespace):
        print(f"[podrunner] watching pods annotated {ANNOTATION}=true; logs under {args.workdir}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
