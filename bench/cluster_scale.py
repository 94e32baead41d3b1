"""How far the local control plane scales on this machine: 1,000 GPU nodes, 1,000 GPU pods.

Starts a fresh ``e2e.cluster.LocalCluster``, then measures
  * control-plane start time (processes up, /readyz, controllers working),
  * summed RSS of etcd, kube-apiserver, controller manager, scheduler and KWOK when idle,
  * time to create N simulated 8-GPU nodes until all are Ready, and RSS at N nodes,
  * time for a Deployment of M replicas, each asking ``nvidia.com/gpu: 1``, to reach M
    Running pods (ReplicaSet controller -> scheduler -> KWOK), and RSS then.
Writes ``bench/results/cluster_scale.json`` and ``.md``. A recorded benchmark, not a test.

    python -m bench.cluster_scale [--nodes 1000] [--pods 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from kubernetes import client

from e2e import procs
from e2e.cluster import LocalCluster, find_bin_dir
from e2e.nodes import GPU_TOLERATION, api_client, create_gpu_nodes, wait_nodes_ready

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mib(cluster: LocalCluster) -> dict[str, float]:
    per = {comp: procs.rss_bytes(pid) / 2**20 for comp, pid in cluster.pids.items()}
    per["total"] = sum(per.values())
    return {k: round(v, 1) for k, v in per.items()}


def cpu_s(cluster: LocalCluster) -> float:
    return sum(procs.cpu_seconds(pid) for pid in cluster.pids.values())


def machine(bin_dir: Path) -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])

    def version(binary: str) -> str:
        out = subprocess.run([str(bin_dir / binary), "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[0]

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "versions": {b: version(b) for b in ("kube-apiserver", "etcd", "kwok")}}


def gpu_deployment(replicas: int) -> dict[str, object]:
    labels = {"app": "scale"}
    return {"metadata": {"name": "scale"}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels}, "spec": {
            "tolerations": [GPU_TOLERATION], "nodeSelector": {"kvfleet.io/node-pool": "gpu"},
            "containers": [{"name": "engine", "image": "registry.k8s.io/pause:3.10",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}}}


def wait_running(core: client.CoreV1Api, want: int, timeout_s: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        pods = core.list_namespaced_pod("default", label_selector="app=scale", field_selector="status.phase=Running")
        if len(pods.items) >= want:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {want} pods Running after {timeout_s}s")


def run(nodes: int, pods: int) -> dict[str, object]:
    bin_dir = find_bin_dir()
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    cluster = LocalCluster.start(f"bench-{os.getpid()}", bin_dir=bin_dir, tie_to_parent=True)
    result: dict[str, object] = {"nodes": nodes, "pods": pods, "start_s": round(time.monotonic() - t0, 2)}
    try:
        time.sleep(10)
        result["rss_idle_mib"] = rss_mib(cluster)
        t0, c0 = time.monotonic(), cpu_s(cluster)
        names = create_gpu_nodes(cluster.kubeconfig, nodes)
        result["nodes_created_s"] = round(time.monotonic() - t0, 2)
        wait_nodes_ready(cluster.kubeconfig, names, timeout_s=600)
        result["nodes_ready_s"] = round(time.monotonic() - t0, 2)
        result["nodes_ready_cpu_s"] = round(cpu_s(cluster) - c0, 1)
        time.sleep(10)
        result["rss_nodes_mib"] = rss_mib(cluster)
        with api_client(cluster.kubeconfig) as api:
            t0, c0 = time.monotonic(), cpu_s(cluster)
            client.AppsV1Api(api).create_namespaced_deployment("default", gpu_deployment(pods))
            wait_running(client.CoreV1Api(api), pods)
            result["pods_running_s"] = round(time.monotonic() - t0, 2)
            result["pods_running_cpu_s"] = round(cpu_s(cluster) - c0, 1)
        time.sleep(10)
        result["rss_nodes_pods_mib"] = rss_mib(cluster)
    finally:
        cluster.stop()
    result["machine"] = machine(bin_dir)
    # The benchmark host may be shared: the 1-minute load average says how much.
    result["loadavg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def markdown(r: dict[str, object]) -> str:
    m = r["machine"]
    assert isinstance(m, dict)
    rss = {k: r[k] for k in ("rss_idle_mib", "rss_nodes_mib", "rss_nodes_pods_mib")}
    comps = list(r["rss_idle_mib"])  # type: ignore[arg-type]
    lines = [
        "# Local control plane at scale", "",
        f"{r['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), Linux {m['kernel']}; "
        + ", ".join(m["versions"].values()) + ".",
        f"1-minute load average {r['loadavg_1m']['before']} before, {r['loadavg_1m']['after']} after "  # type: ignore[index]
        "(other jobs shared the machine when it was higher than the core count).", "",
        "Wall seconds depend on what else runs; control-plane CPU seconds (user+sys of the five",
        "processes) much less so.", "",
        "| step | wall s | control-plane CPU s |", "|---|---|---|",
        f"| control plane start (to /readyz + controllers) | {r['start_s']} | |",
        f"| create {r['nodes']} GPU nodes (API calls) | {r['nodes_created_s']} | |",
        f"| ... until all {r['nodes']} are Ready | {r['nodes_ready_s']} | {r['nodes_ready_cpu_s']} |",
        f"| Deployment of {r['pods']} x `nvidia.com/gpu: 1` to all Running | {r['pods_running_s']} "
        f"| {r['pods_running_cpu_s']} |", "",
        "RSS in MiB (10 s after each step):", "",
        "| component | idle | " + f"{r['nodes']} nodes | {r['nodes']} nodes + {r['pods']} pods |",
        "|---|---|---|---|",
    ]
    for comp in comps:
        lines.append(f"| {comp} | " + " | ".join(str(rss[k][comp]) for k in rss) + " |")  # type: ignore[index]
    lines += ["", "Reproduce: `make bench-cluster` (or `python -m bench.cluster_scale --nodes N --pods M`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--out", default=str(RESULTS / "cluster_scale"))
    args = parser.parse_args()
    result = run(args.nodes, args.pods)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
