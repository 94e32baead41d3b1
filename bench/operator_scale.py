"""The operator at fleet scale: 100 InferenceFleets on 1,000 simulated GPU nodes.

Starts a fresh local control plane (``e2e.cluster.LocalCluster``) with N KWOK 8-GPU
nodes, installs the CRDs and one set of references, runs ``python -m kvfleet.operator``
as a subprocess, then measures
  * create -> Available: F fleets applied at once (prefill 1 + decode 1 + router 1, one
    GPU per engine pod); per-fleet seconds from its create to Available=True
    (children applied, Deployments rolled out, pods Running on KWOK nodes), p50/p99/max;
  * reconcile latency of a spec change: one fleet at a time, patch
    `spec.topology.decode.maxNumSeqs` (a new EngineConfig -> ConfigMap + pod-template
    hash) and time until `status.observedGeneration` reaches the new generation, i.e.
    watch delivery + queue + resolve + apply of every child + status write; p50/p99/max;
  * the operator's RSS (peak and at the end) from /proc.
Writes ``bench/results/operator_scale.json`` and ``.md``. A recorded benchmark, not a test.

    python -m bench.operator_scale [--nodes 1000] [--fleets 100] [--changes 100]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.cluster_scale import machine
from e2e.cluster import LocalCluster, find_bin_dir
from e2e.nodes import create_gpu_nodes, wait_nodes_ready

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NS = "bench"
TOLERATE = [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]
GOAL_P99_S, GOAL_RSS_MB = 1.0, 250.0


def references() -> list[dict[str, Any]]:
    api = "kvfleet.io/v1alpha1"
    return [
        {"apiVersion": api, "kind": "ModelVariant", "metadata": {"name": "tiny", "namespace": NS},
         "spec": {"family": "tiny", "base": {"builtin": "tiny-llama"}}},
        {"apiVersion": api, "kind": "SLOClass", "metadata": {"name": "interactive", "namespace": NS},
         "spec": {"ttftMs": 300, "tpotMs": 50}},
        {"apiVersion": api, "kind": "CachePolicy", "metadata": {"name": "int8", "namespace": NS},
         "spec": {"quantization": {"dtype": "int8"}}},
    ]


def fleet(i: int) -> dict[str, Any]:
    role = {"minReplicas": 1, "maxReplicas": 4, "resources": {"requests": {"nvidia.com/gpu": 1}},
            "placement": {"tolerations": TOLERATE}}
    return {"apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet",
            "metadata": {"name": f"f{i:03d}", "namespace": NS},
            "spec": {"variants": [{"name": "tiny"}], "cachePolicy": "int8", "sloClasses": ["interactive"],
                     "topology": {"mode": "disaggregated", "prefill": role, "decode": role},
                     "router": {"placement": {"tolerations": TOLERATE}}}}


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 0.5 s; `peak_mb` and `last_mb`."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.last_mb, self.stop = pid, 0.0, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.last_mb = int(line.split()[1]) / 1024
                        self.peak_mb = max(self.peak_mb, self.last_mb)
            except OSError:
                return
            time.sleep(0.5)


class Rereadier(threading.Thread):
    """Plays the kubelet's readiness probe for pods the node-lifecycle controller marked NotReady.

    NOTE: under CPU starvation KWOK's node heartbeats lag, the controller manager marks
    nodes Unknown and their pods Ready=False; when the nodes come back, a kubelet would
    report the pods Ready again on its next probe, but KWOK 0.8's default pod stages only
    make *Pending* pods Ready, so those pods would stay NotReady forever. This thread sets
    Ready=True again on Running pods whose containers are ready, and counts them.
    """

    def __init__(self, kube: Any):
        super().__init__(daemon=True)
        self.kube, self.stop, self.count = kube, threading.Event(), 0

    def run(self) -> None:
        while not self.stop.wait(2.0):
            try:
                pods = self.kube.request("GET", f"/api/v1/namespaces/{NS}/pods",
                                         query={"fieldSelector": "status.phase=Running"})["items"]
                for pod in pods:
                    conds = {c["type"]: c["status"] for c in pod["status"].get("conditions") or ()}
                    if conds.get("Ready") == "False" and conds.get("ContainersReady") == "True":
                        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                        self.kube.request(
                            "PATCH", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/status",
                            body={"status": {"conditions": [{"type": "Ready", "status": "True",
                                                             "lastTransitionTime": now}]}},
                            content_type="application/strategic-merge-patch+json")
                        self.count += 1
            except Exception as exc:  # noqa: BLE001 - best effort, keep going
                print(f"rereadier: {exc}", file=sys.stderr)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_s": round(statistics.median(values), 3), "p99_s": round(pct(values, 99), 3),
            "max_s": round(max(values), 3), "mean_s": round(statistics.fmean(values), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.operator_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--fleets", type=int, default=100)
    p.add_argument("--changes", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS / "operator_scale"))
    args = p.parse_args(argv)
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kvfleet.operator import apply as writes
    from kvfleet.operator.kube import Kube

    bin_dir = find_bin_dir()
    t0 = time.monotonic()
    cluster = LocalCluster.start(f"bench-op-{os.getpid()}", bin_dir=bin_dir, tie_to_parent=True)
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "machine": machine(bin_dir), "nodes": args.nodes, "fleets": args.fleets}
    op = None
    try:
        names = create_gpu_nodes(cluster.kubeconfig, args.nodes)
        wait_nodes_ready(cluster.kubeconfig, names, timeout_s=600)
        result["nodes_ready_s"] = round(time.monotonic() - t0, 1)
        kubectl = str(bin_dir / "kubectl")
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        for crd in sorted((ROOT / "crds").glob("*.yaml")):
            subprocess.run([kubectl, "apply", "--server-side", "-f", str(crd)], env=env, check=True,
                           capture_output=True)
        subprocess.run([kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"], env=env,
                       check=True, capture_output=True)
        subprocess.run([kubectl, "create", "namespace", NS], env=env, check=True, capture_output=True)
        cfg = k8s.Configuration()
        k8s_config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        kube = Kube(cfg)
        for doc in references():
            writes.apply(kube, doc)
        log = open(cluster.dir / "operator.log", "wb")  # noqa: SIM115
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        op = subprocess.Popen([sys.executable, "-m", "kvfleet.operator", "-n", NS,
                               "--liveness", f"http://127.0.0.1:{port}/healthz"],
                              stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
        sampler = RssSampler(op.pid)
        sampler.start()
        rereadier = Rereadier(kube)
        rereadier.start()
        time.sleep(3)
        result["operator_rss_idle_mb"] = round(sampler.last_mb, 1)

        # -- create -> Available ---------------------------------------------------------------
        created: dict[str, float] = {}
        start = time.monotonic()
        for i in range(args.fleets):
            doc = fleet(i)
            writes.apply(kube, doc)
            created[doc["metadata"]["name"]] = time.monotonic()
        result["create_calls_s"] = round(time.monotonic() - start, 2)
        ready: dict[str, float] = {}
        deadline = time.monotonic() + 600
        while len(ready) < args.fleets and time.monotonic() < deadline:
            for f in kube.list("InferenceFleet", NS):
                name = f["metadata"]["name"]
                conds = {c["type"]: c["status"] for c in (f.get("status") or {}).get("conditions") or ()}
                if name not in ready and conds.get("Available") == "True":
                    ready[name] = time.monotonic()
            time.sleep(0.25)
        to_available = [ready[n] - created[n] for n in ready]
        result["create_to_available"] = {**stats(to_available), "all_available_s": round(
            max(ready.values()) - start, 2), "available": len(ready)}

        # -- reconcile latency of a spec change ---------------------------------------------------
        time.sleep(5)  # let rollouts and status writes settle
        latencies = []
        for i in range(args.changes):
            name = f"f{i % args.fleets:03d}"
            body = kube.get("InferenceFleet", NS, name)
            gen = body["metadata"]["generation"]
            patch = {"spec": {"topology": {"decode": {"maxNumSeqs": 64 + 1 + i}}}}
            t = time.monotonic()
            kube.request("PATCH", f"/apis/kvfleet.io/v1alpha1/namespaces/{NS}/inferencefleets/{name}", body=patch,
                         content_type="application/merge-patch+json")
            while True:
                f = kube.get("InferenceFleet", NS, name)
                if ((f.get("status") or {}).get("observedGeneration") or 0) > gen:
                    latencies.append(time.monotonic() - t)
                    break
                if time.monotonic() - t > 60:
                    raise TimeoutError(f"{name} not reconciled within 60 s")
                time.sleep(0.01)
            time.sleep(0.2)
        result["spec_change_reconcile"] = stats(latencies)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            result["operator_internal_reconciles"] = json.loads(resp.read()).get("queue")
        time.sleep(2)
        result["operator_rss_mb"] = {"peak": round(sampler.peak_mb, 1), "end": round(sampler.last_mb, 1)}
        result["pods_running"] = int(subprocess.run(
            [kubectl, "get", "pods", "-n", NS, "--field-selector=status.phase=Running", "--no-headers"],
            env=env, capture_output=True, text=True).stdout.count("\n"))
        result["goals"] = {"p99_reconcile_le_1s": result["spec_change_reconcile"]["p99_s"] <= GOAL_P99_S,
                           "rss_le_250mb": result["operator_rss_mb"]["peak"] <= GOAL_RSS_MB}
        result["pods_made_ready_again_by_bench"] = rereadier.count
        sampler.stop.set()
        rereadier.stop.set()
        kube.close()
    finally:
        if op is not None:
            op.terminate()
            op.wait(timeout=30)
        cluster.stop()
    write(result, Path(args.out))
    print(json.dumps(result, indent=1))
    return 0


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    m, c, s, r = result["machine"], result["create_to_available"], result["spec_change_reconcile"], \
        result["operator_rss_mb"]
    md = f"""# Operator at fleet scale

{result['started']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), Linux {m['kernel']}, Python {m['python']};
{', '.join(m['versions'].values())}. One operator process (`python -m kvfleet.operator`, 8 workers), shared machine.

{result['nodes']} simulated 8-GPU nodes (KWOK), {result['fleets']} InferenceFleets created at once, each disaggregated
(prefill 1 + decode 1 + router 1 pod, one GPU per engine pod; {result['pods_running']} pods Running at the end).

| measure | n | p50 s | p99 s | max s | goal |
|---|---|---|---|---|---|
| fleet create -> Available (pods Running) | {c['n']} | {c['p50_s']} | {c['p99_s']} | {c['max_s']} | |
| spec change -> status.observedGeneration (end to end) | {s['n']} | {s['p50_s']} | {s['p99_s']} | {s['max_s']} | p99 <= 1 s: {'met' if result['goals']['p99_reconcile_le_1s'] else 'NOT met'} |

Pods set Ready again by the bench after KWOK node heartbeat lag (see `Rereadier`): {result['pods_made_ready_again_by_bench']}.
Inside the operator, every reconcile of the run (create, readiness-driven, spec changes; {result['operator_internal_reconciles']['reconciles']} in all,
{result['operator_internal_reconciles']['failures']} retried): p50 {result['operator_internal_reconciles']['p50_s']} s, p99 {result['operator_internal_reconciles']['p99_s']} s, max {round(result['operator_internal_reconciles']['max_s'], 3)} s
(dequeue to status written). The end-to-end figure adds the watch delivery to kopf, the queue and the status read-back by the benchmark.

All {c['available']} fleets Available {c['all_available_s']} s after the first create ({result['create_calls_s']} s of create calls).
Operator RSS: {result['operator_rss_idle_mb']} MiB idle, {r['peak']} MiB peak, {r['end']} MiB at the end
(goal <= 250 MB: {'met' if result['goals']['rss_le_250mb'] else 'NOT met'}).

Reproduce: `make bench-operator` (or `python -m bench.operator_scale --nodes N --fleets F --changes C`).
"""
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    raise SystemExit(main())
