"""`make demo-images`: kvfleet from its images, the way a cluster would run it, on one machine.

1. the two images (`make image`: podman, no Docker) are pushed to a registry on loopback;
2. a real control plane with simulated GPU nodes (KWOK); the pod runner in image mode runs opted-in pods
   from their images with podman (pulling them from the registry), bound to the pod IPs;
3. `helm install` with `image.repository` / `engineImage.repository` pointing at the registry: the operator
   runs IN A POD from its image, as uid 10001 with a read-only root, and turns Ready;
4. a colocated fleet of SmolLM2-135M-Instruct: the operator creates its engine Deployment, the engine pod runs
   the engine image, and the `openai` SDK talks to it on its pod IP.

    python -m e2e.demo_images [--keep]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from e2e import imagemode
from e2e.cluster import REPO, LocalCluster, find_bin_dir
from e2e.demo import Demo, chat, finish, step
from e2e.harness import serving_pod_ips, wait_for
from e2e.images import Registry, chart_values, colocated_fleet_docs, ensure_images, local_ref
from e2e.nodes import create_gpu_nodes, wait_nodes_ready
from e2e.podrunner import PodRunner

NAMESPACE, SYSTEM_NS, RELEASE, FLEET = "kvfleet-demo", "kvfleet-system", "kvfleet", "smollm2-colo"


def run(demo: Demo, registry: Registry, workdir: Path) -> None:
    c = demo.cluster
    tag = "demo"
    step(f"push the images to the loopback registry {registry.host}")
    t0 = time.monotonic()
    refs = [registry.push(local_ref(image), f"kvfleet-{image}:{tag}") for image in ("operator", "engine")]
    print("\n".join(refs))
    print(f"(pushed in {time.monotonic() - t0:.1f}s; layers the registry already has are skipped)")

    step("simulated GPU nodes (KWOK): 2 nodes x 8 nvidia.com/gpu")
    wait_nodes_ready(c.kubeconfig, create_gpu_nodes(c.kubeconfig, 2))

    with PodRunner(c.kubeconfig, workdir / "pods", images=True):
        step("helm install the chart; the operator image comes from the registry and runs in a pod")
        values = workdir / "values.yaml"
        values.write_text(yaml.safe_dump(chart_values(registry.host, tag, [NAMESPACE])))
        print(values.read_text())
        demo.kubectl("create", "namespace", NAMESPACE)
        demo.tool("helm", "install", RELEASE, str(REPO / "charts" / "kvfleet"), "-n", SYSTEM_NS,
                  "--create-namespace", "-f", str(values), show=True)

        def operator_ip() -> list[str]:
            return serving_pod_ips(demo.get("pods", "-n", SYSTEM_NS)["items"], port=8080, path="/healthz")

        wait_for("the operator pod answering /healthz", operator_ip, 180)
        demo.kubectl("wait", "--for=condition=Ready", "pod", "--all", "-n", SYSTEM_NS, "--timeout=60s")
        demo.kubectl("get", "pods", "-n", SYSTEM_NS, "-o", "wide", show=True)
        print("$ podman ps\n" + imagemode.podman("ps", "--format", "{{.Names}}  {{.Image}}  {{.Command}}").stdout.strip())

        step(f"a colocated fleet of SmolLM2-135M-Instruct ({FLEET}); its engine pod runs the engine image")
        demo.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump_all(colocated_fleet_docs(FLEET)),
                     show=True)
        ips = wait_for("a serving engine pod (image pull + model import)", lambda: demo.serving_engine_pods(FLEET),
                       300)
        pod = demo.get("pods", "-n", NAMESPACE, "-l", f"kvfleet.io/fleet={FLEET},kvfleet.io/role=engine")["items"][0]
        print(f"engine pod {pod['metadata']['name']} on {ips[0]}: image {pod['spec']['containers'][0]['image']}")
        for prompt in ("What is the capital of France?", "Write a haiku about GPUs."):
            text, ttft, total, tokens = chat(ips[0], prompt)
            print(f"[{ips[0]}] {prompt!r}\n  -> {text.strip()!r}\n  ({tokens} tokens, TTFT {ttft * 1000:.0f} ms)")
        status = demo.get("fleet", FLEET, "-n", NAMESPACE).get("status", {})
        print(json.dumps({c["type"]: c["status"] for c in status.get("conditions", [])}))
        demo.kubectl("delete", "fleet", FLEET, "-n", NAMESPACE, "--wait=true", show=True)
        demo.tool("helm", "uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", show=True)
    for ref in refs:
        registry.drop_local(ref)  # the names the runner pulled; the layers stay with the local images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.demo_images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    args = p.parse_args(argv)
    step("the images (e2e/build-images.sh; reused when warm)")
    ensure_images("dev")
    step("start a local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK)")
    cluster = LocalCluster.start("kvfleet-demo-images", bin_dir=find_bin_dir(), tie_to_parent=not args.keep)
    workdir = cluster.dir / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        with Registry() as registry:
            run(Demo(cluster), registry, workdir)
        ok = True
    finally:
        finish(cluster, workdir, ok, args.keep)
    step("demo finished" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
