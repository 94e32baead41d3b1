"""A real, throwaway Kubernetes control plane on loopback: no Docker, no kubelet.

Starts etcd, kube-apiserver (TLS, RBAC, ServiceAccount tokens), kube-controller-manager,
kube-scheduler and the KWOK controller from the binaries ``e2e/build-binaries.sh``
caches, each on free 127.0.0.1 ports, with its own directory, PKI and admin
kubeconfig, so several clusters can run side by side. KWOK simulates the nodes and
hands out pod IPs from a per-cluster loopback range ``127.N.0.0/16`` that local
processes can bind (see ``e2e/podrunner.py``).

    python -m e2e.cluster up [--name kvfleet] [--gpu-nodes 4] [--no-podrunner]
    python -m e2e.cluster status|down [--name kvfleet]
    python -m e2e.cluster prune        # remove clusters whose processes all died (killed test runs)

Only the standard library is used here, so the launcher runs with any Python 3.11.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

from e2e import procs
from e2e.pki import Pki, create_pki

REPO = Path(__file__).resolve().parent.parent
CLUSTERS_ROOT = Path(os.environ.get("KVFLEET_CLUSTERS_DIR", Path(tempfile.gettempdir()) / "kvfleet-clusters"))
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
KWOK_NODE_SELECTOR = "kwok.x-k8s.io/node=fake"
ALWAYS_ALLOW = "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"


def log(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find_bin_dir() -> Path:
    """The cached binaries dir: ``$KVFLEET_BIN_DIR``, else whatever build-binaries.sh prints (builds if cold)."""
    if env := os.environ.get("KVFLEET_BIN_DIR"):
        return Path(env)
    out = subprocess.run([str(REPO / "e2e" / "build-binaries.sh")], stdout=subprocess.PIPE, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _claim_slot(cluster_dir: Path) -> int:
    """Reserve N for the pod CIDR 127.N.0.0/16 (1..254); stale claims of removed clusters are reused."""
    slots = CLUSTERS_ROOT / ".slots"
    for n in range(1, 255):
        claim = slots / str(n)
        slots.mkdir(parents=True, exist_ok=True)  # again each time: a concurrent stop may rmdir it
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileNotFoundError:
            return _claim_slot(cluster_dir)
        except FileExistsError:
            if Path(claim.read_text().strip() or "/nonexistent").exists():
                continue
            claim.unlink(missing_ok=True)
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
        os.write(fd, str(cluster_dir).encode())
        os.close(fd)
        return n
    raise RuntimeError(f"all 254 pod-CIDR slots under {slots} are taken")


def _kubeconfig(server: str, pki: Pki, user: str) -> str:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kvfleet",
        "clusters": [{"name": "kvfleet", "cluster": {"server": server, "certificate-authority-data": b64(pki.ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(pki.cert(user)),
                                          "client-key-data": b64(pki.key(user))}}],
        "contexts": [{"name": "kvfleet", "context": {"cluster": "kvfleet", "user": user}}],
    }, indent=1)


@dataclass
class LocalCluster:
    """One running control plane; ``state.json`` in ``dir`` lets another process find and stop it."""

    name: str
    dir: Path
    bin_dir: Path
    ports: dict[str, int]
    pod_cidr: str
    slot: int
    node_grace_s: int = 300
    pids: dict[str, int] = field(default_factory=dict)
    _popens: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # ---- addresses and files -------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def pki(self) -> Pki:
        return Pki(self.dir / "pki")

    def log_path(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    def _save(self) -> None:
        state = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        state = {k: (str(v) if isinstance(v, Path) else v) for k, v in state.items()}
        (self.dir / "state.json").write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, name: str) -> LocalCluster:
        """Attach to a cluster started by another process (``up``) by its name."""
        state = json.loads((CLUSTERS_ROOT / name / "state.json").read_text())
        state["dir"], state["bin_dir"] = Path(state["dir"]), Path(state["bin_dir"])
        state.pop("_popens", None)
        return cls(**state)

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    def start(cls, name: str | None = None, *, bin_dir: Path | None = None, tie_to_parent: bool = False,
              timeout_s: float = 120.0, node_grace_s: int = 300) -> LocalCluster:
        """Start every component, wait until the API is ready and controllers work; stop all on failure.

        ``node_grace_s`` is how long a node may miss heartbeats before the controller manager
        marks it NotReady (upstream: 50 s). KWOK's heartbeats lag when the host is starved of
        CPU, and KWOK never re-readies pods that were marked NotReady, so the default is long;
        lower it for tests that stop KWOK to simulate node loss.
        """
        name = name or f"c{os.getpid()}-{int(time.time() * 1000) % 100000}"
        cluster_dir = CLUSTERS_ROOT / name
        if (cluster_dir / "state.json").exists():
            raise RuntimeError(f"cluster {name!r} already exists in {cluster_dir}; run `python -m e2e.cluster down --name {name}`")
        bin_dir = bin_dir or find_bin_dir()
        for attempt in (1, 2):
            cluster_dir.mkdir(parents=True, exist_ok=True)
            slot = _claim_slot(cluster_dir)
            ports = {k: procs.free_port() for k in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")}
            cluster = cls(name, cluster_dir, bin_dir, ports, f"127.{slot}.0.0/16", slot, node_grace_s)
            try:
                cluster._start_all(tie_to_parent, timeout_s)
                return cluster
            except Exception:
                logs = [p.read_text(errors="replace") for p in (cluster_dir / "logs").glob("*.log")]
                if attempt == 1 and any("address already in use" in text for text in logs):
                    log("a port was taken between picking and binding it; retrying with fresh ports")
                    cluster.stop()
                    continue
                cluster._report_failure()
                raise
            except BaseException:
                cluster.stop()
                raise
        raise AssertionError("unreachable")

    def _report_failure(self) -> None:
        """Print each component's log tail and stop everything, keeping the logs."""
        log(f"start failed; component logs are in {self.dir / 'logs'} (tails below)")
        for comp in COMPONENTS:
            path = self.log_path(comp)
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {comp} ---\n" + "\n".join(tail), file=sys.stderr)
        self.stop(keep_dir=True)

    def _start_all(self, tie: bool, timeout_s: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        pki = create_pki(self.dir / "pki")
        self.kubeconfig.write_text(_kubeconfig(self.server, pki, "admin"))
        for user in ("controller-manager", "scheduler"):
            (self.dir / f"{user}.kubeconfig").write_text(_kubeconfig(self.server, pki, user))
        self._save()
        self._run("etcd", self._etcd_args(), tie)
        self._wait("etcd", deadline, lambda: self._get(f"http://127.0.0.1:{self.ports['etcd']}/health", tls=False))
        self._run("kube-apiserver", self._apiserver_args(pki), tie)
        self._wait("kube-apiserver", deadline, lambda: self._get(f"{self.server}/readyz"))
        self._run("kube-controller-manager", self._controller_manager_args(pki), tie)
        self._run("kube-scheduler", self._scheduler_args(), tie)
        self._run("kwok", self._kwok_args(), tie)
        for comp, key in (("kube-controller-manager", "controller-manager"), ("kube-scheduler", "scheduler")):
            url = f"https://127.0.0.1:{self.ports[key]}/healthz"
            self._wait(comp, deadline, lambda url=url: self._get(url, verify=False))
        # Pods are only admitted once the default ServiceAccount exists: proof that the
        # controller manager's serviceaccount and root-CA publisher controllers run.
        self._wait("controllers", deadline, lambda: (
            self._get(f"{self.server}/api/v1/namespaces/default/serviceaccounts/default")
            and self._get(f"{self.server}/api/v1/namespaces/default/configmaps/kube-root-ca.crt")))
        log(f"cluster {self.name} ready in {time.monotonic() - t0:.1f}s at {self.server} (pod CIDR {self.pod_cidr})")

    def stop(self, keep_dir: bool = False) -> None:
        """Stop components (newest first) with SIGTERM then SIGKILL, release the slot, remove the dir."""
        for comp in reversed(list(self.pids)):
            procs.terminate(self.pids[comp], exe_hint=self._cmdline_mark, popen=self._popens.get(comp))
        self.pids.clear()
        claim = CLUSTERS_ROOT / ".slots" / str(self.slot)
        if claim.exists() and claim.read_text().strip() == str(self.dir):
            claim.unlink()
        if keep_dir:
            (self.dir / "state.json").unlink(missing_ok=True)
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        for empty in (claim.parent, CLUSTERS_ROOT):  # leave nothing behind once the last cluster is gone
            try:
                empty.rmdir()
            except OSError:
                break

    # ---- faults (tests stop and restart single components) --------------------------------
    def stop_component(self, comp: str) -> None:
        """Stop one component (SIGTERM, then SIGKILL); ``start_component`` brings it back."""
        procs.terminate(self.pids.pop(comp), exe_hint=self._cmdline_mark, popen=self._popens.pop(comp, None))
        self._save()

    def start_component(self, comp: str, timeout_s: float = 60.0) -> None:
        """Start a stopped etcd or kube-apiserver again, same flags, ports and data; wait until it serves."""
        deadline = time.monotonic() + timeout_s
        if comp == "etcd":
            self._run(comp, self._etcd_args(), tie=True)
            self._wait(comp, deadline, lambda: self._get(f"http://127.0.0.1:{self.ports['etcd']}/health", tls=False))
        elif comp == "kube-apiserver":
            self._run(comp, self._apiserver_args(self.pki), tie=True)
            self._wait(comp, deadline, lambda: self._get(f"{self.server}/readyz"))
        else:
            raise ValueError(f"restarting {comp} is not supported")

    def etcd_compact(self) -> int:
        """Compact etcd's history up to its current revision (older watches then get 410 Gone); returns it."""
        base = f"http://127.0.0.1:{self.ports['etcd']}/v3/kv"

        def post(path: str, body: dict[str, object]) -> dict[str, object]:
            req = urllib.request.Request(f"{base}/{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]

        revision = int(post("range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])  # type: ignore[index]
        post("compaction", {"revision": str(revision), "physical": True})
        return revision

    def status(self) -> dict[str, bool]:
        """Which components are alive, plus whether the apiserver answers /readyz."""
        out = {comp: procs.alive(pid, self._cmdline_mark) for comp, pid in self.pids.items()}
        out["readyz"] = bool(self._get(f"{self.server}/readyz"))
        return out

    def pid_list(self) -> list[int]:
        return list(self.pids.values())

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def _cmdline_mark(self) -> str:
        """Every component's command line names this cluster's directory: a guard against reused pids."""
        return str(self.dir)

    def _run(self, comp: str, argv: list[str], tie: bool, cwd: Path | None = None) -> None:
        popen = procs.spawn(argv, self.log_path(comp), tie_to_parent=tie, cwd=cwd or self.dir)
        self.pids[comp], self._popens[comp] = popen.pid, popen
        self._save()

    def _get(self, url: str, *, tls: bool = True, verify: bool = True) -> bytes | None:
        try:
            ctx = None
            if tls:
                ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert)) if verify else ssl._create_unverified_context()
                ctx.load_cert_chain(str(self.pki.cert("admin")), str(self.pki.key("admin")))
            with urllib.request.urlopen(url, timeout=3, context=ctx) as resp:
                return resp.read() if resp.status == 200 else None
        except OSError:
            return None

    def _wait(self, what: str, deadline: float, ready: object) -> None:
        while time.monotonic() < deadline:
            for comp, popen in self._popens.items():
                if popen.poll() is not None:
                    raise RuntimeError(f"{comp} exited with {popen.returncode}; see {self.log_path(comp)}")
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready in time; see {self.dir / 'logs'}")

    def _etcd_args(self) -> list[str]:
        client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [str(self.bin_dir / "etcd"), "--name=node0", f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=node0={peer}", "--unsafe-no-fsync", "--log-level=warn",
                "--auto-compaction-retention=1", "--quota-backend-bytes=8589934592"]

    def _apiserver_args(self, pki: Pki) -> list[str]:
        return [str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1", f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.cert('apiserver')}", f"--tls-private-key-file={pki.key('apiserver')}",
                f"--client-ca-file={pki.ca_cert}",
                f"--requestheader-client-ca-file={pki.cert('front-proxy-ca')}",
                "--requestheader-allowed-names=front-proxy-client", "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group", "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki.cert('front-proxy-client')}",
                f"--proxy-client-key-file={pki.key('front-proxy-client')}",
                "--authorization-mode=Node,RBAC", "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # NOTE: the `kubernetes` Service would advertise 127.0.0.1, which Endpoints
                # validation rejects as loopback; in-cluster clients get KUBECONFIG instead.
                "--endpoint-reconciler-type=none",
                "--max-requests-inflight=800", "--max-mutating-requests-inflight=400",
                "--profiling=false", "--v=0"]

    def _controller_manager_args(self, pki: Pki) -> list[str]:
        kc = self.dir / "controller-manager.kubeconfig"
        return [str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1", f"--secure-port={self.ports['controller-manager']}",
                f"--cert-dir={self.dir / 'kcm-certs'}", ALWAYS_ALLOW, "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
                f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
                "--kube-api-qps=1000", "--kube-api-burst=2000", f"--node-monitor-grace-period={self.node_grace_s}s",
                "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10",
                "--concurrent-gc-syncs=40", "--profiling=false", "--v=0"]

    def _scheduler_args(self) -> list[str]:
        kc = self.dir / "scheduler.kubeconfig"
        config = self.dir / "scheduler.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(kc), "qps": 1000, "burst": 2000},
            "leaderElection": {"leaderElect": False},
        }))
        return [str(self.bin_dir / "kube-scheduler"), f"--config={config}",
                f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={self.dir / 'scheduler-certs'}", ALWAYS_ALLOW, "--profiling=false", "--v=0"]

    def _kwok_args(self) -> list[str]:
        # Upstream's default of 4 workers per stage makes 1,000 nodes take a minute to turn Ready.
        config = self.dir / "kwok.yaml"
        config.write_text(json.dumps({
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration",
            "options": {"nodePlayStageParallelism": 16, "podPlayStageParallelism": 16, "nodeLeaseParallelism": 8},
        }))
        return [str(self.bin_dir / "kwok"), f"--kubeconfig={self.kubeconfig}",
                f"--config={self.bin_dir / 'kwok-stages.yaml'}", f"--config={config}",
                "--manage-all-nodes=false", f"--manage-nodes-with-annotation-selector={KWOK_NODE_SELECTOR}",
                f"--cidr={self.pod_cidr}", "--node-ip=127.0.0.1", "--node-lease-duration-seconds=40"]


def prune_dead_clusters(min_age_s: float = 60.0) -> list[str]:
    """Remove clusters whose processes are all gone (a killed test run); returns their names."""
    pruned = []
    for state in CLUSTERS_ROOT.glob("*/state.json"):
        try:
            if time.time() - state.stat().st_mtime < min_age_s:
                continue
            cluster = LocalCluster.load(state.parent.name)
        except (OSError, ValueError, TypeError):
            continue
        if cluster.pids and not any(procs.alive(pid, str(cluster.dir)) for pid in cluster.pids.values()):
            cluster.stop()
            pruned.append(cluster.name)
    return pruned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "status", "prune"))
    parser.add_argument("--name", default=os.environ.get("KVFLEET_CLUSTER", "kvfleet"))
    parser.add_argument("--gpu-nodes", type=int, default=4, help="simulated 8-GPU nodes to create on `up`")
    parser.add_argument("--no-podrunner", action="store_true", help="do not start the local pod runner on `up`")
    parser.add_argument("--node-grace-s", type=int, default=300,
                        help="seconds without heartbeat before a node turns NotReady (upstream 50)")
    args = parser.parse_args(argv)
    if args.action == "prune":
        for name in prune_dead_clusters():
            log(f"removed dead cluster {name}")
        return 0
    if args.action == "up":
        cluster = LocalCluster.start(args.name, node_grace_s=args.node_grace_s)
        try:
            if args.gpu_nodes:
                from e2e.nodes import create_gpu_nodes, wait_nodes_ready  # needs the kubernetes client

                names = create_gpu_nodes(cluster.kubeconfig, args.gpu_nodes)
                wait_nodes_ready(cluster.kubeconfig, names)
                log(f"{len(names)} simulated GPU nodes Ready")
            if not args.no_podrunner:
                cluster._run("podrunner", [sys.executable, "-m", "e2e.podrunner", "--kubeconfig", str(cluster.kubeconfig),
                                           "--workdir", str(cluster.dir / "pods")], tie=False, cwd=REPO)
                log(f"pod runner started; pod logs in {cluster.dir / 'pods'}")
        except BaseException:
            cluster.stop()
            raise
        print(f"export KUBECONFIG={cluster.kubeconfig}")
        print(f"export PATH={cluster.bin_dir}:$PATH  # kubectl, helm, kwokctl")
        return 0
    try:
        cluster = LocalCluster.load(args.name)
    except FileNotFoundError:
        print(f"no cluster named {args.name!r} under {CLUSTERS_ROOT}", file=sys.stderr)
        return 0 if args.action == "down" else 1
    if args.action == "down":
        cluster.stop()
        log(f"cluster {args.name} stopped and {cluster.dir} removed")
        return 0
    status = cluster.status()
    print(json.dumps({"name": cluster.name, "server": cluster.server, "kubeconfig": str(cluster.kubeconfig),
                      "pod_cidr": cluster.pod_cidr, "components": status}, indent=1))
    return 0 if all(status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
