"""Inputs on which the CRD (real API server) and the pydantic models must agree: accept or refuse.

Each case is a whole object: a minimal valid object of its kind with one field set. The values
come from a table per class of hole (issue 17) plus seeded random quantity strings, so the
differential test covers the edges of every shape, not just the examples.
"""

from __future__ import annotations

import copy
import random
from typing import Any

BASES: dict[str, dict[str, Any]] = {
    "ModelVariant": {"spec": {"family": "f", "base": {"builtin": "tiny-llama"}}},
    "InferenceFleet": {"spec": {"variants": [{"name": "v"}], "topology": {"mode": "colocated", "engine": {}}}},
    "SLOClass": {"spec": {"ttftMs": 100, "tpotMs": 10}},
    "CachePolicy": {"spec": {}},
}

ENGINE = ("spec", "topology", "engine")
QUANTITY_VALUES: list[Any] = [
    0, 1, 16, 17, 256, 257, -1, -5, 2**62, 1.0, 1.5, True, "1", "0", "16", "17", "1.5", "1.2.3Gi", "1Gi", "4Ti",
    "4097Gi", "8Ei", "500m", "1000m", "-1", "+1", ".5", "1.", ".", "+", "1e3", "1E", "1e", "1K", "1Ki", "1ki",
    " 1", "1 ", "1\n", "", "0x10", "1e-3", "1e+2", "1.0", "2n", "3u", "1mi", "1Mi", "64M", "1e1000000",
]
KEYS: list[str] = [
    "team", "prometheus.io/scrape", "a/b/c", "kvfleet.io/run-locally", "x" * 63, "x" * 64,
    f"{'a' * 253}/n", f"{'a' * 254}/n", "-bad", "bad-", "with space", "UPPER.example.com/x", "example.com/",
    "/name", "kubernetes.io/anything", "container.apparmor.security.beta.kubernetes.io/engine",
    "seccomp.security.alpha.kubernetes.io/pod", "node.k8s.io/x", "k8s.io/x", "notkubernetes.io/x",
    "io.kubernetes.cri-o.Devices", "io.containerd.x", "run.oci.keep_original_groups", "a\nb", "a_b.c-d",
]
LABEL_VALUES: list[Any] = ["h100", "", "NVIDIA-H100-80GB-HBM3", "x" * 63, "x" * 64, "-x", "x y", "a_b.c", 1]
HOST_PATHS: list[Any] = [
    "/models/llama", "/", "//", "/models/../etc", "/models/./x", "/models/", "relative/path", "/models/a b",
    "/models/$(HOME)", "/models/x\n", "/etc", "/etc/x", "/proc/1", "/var/lib/kubelet/pods", "/var/lib/models",
    "/models/..x", "/models/x..", "/run", "/runner", "/models/ü",
]
SUB_PATHS: list[Any] = [
    "", "a", "a/b", "/abs", "../x", "a/../b", "a/./b", "a/", "a//b", ".", "..", "a b", "$(POD_NAME)", "a\tb",
    "...", "a..b",
]
CLAIM_NAMES: list[Any] = ["c", "weights.team-a", "a" * 253, "a" * 254, "A", "a_b", "a..b", ".a", "a.", "-a"]
IMAGES: list[Any] = [
    "kvfleet:test", "ghcr.io/kvfleet/kvfleet:0.1.0", "localhost:5000/a/b", "registry:99999/a",
    "a@sha256:" + "0" * 64, "a@sha256:short", "kvfleet:0.1.0 --privileged", "a\nb", " kvfleet", "Kvfleet",
    "a//b", "a:", "a:-tag", "a:" + "t" * 128, "a__b", "a___b",
]
ENDPOINTS: list[Any] = [
    "http://c:4317", "https://c.ns.svc:4317/v1/traces", "http://10.0.0.1:4317", "http://[::1]:4317",
    "http://c:99999", "http://c:65535", "http://", "http://c d", "http://c:4317 $(curl x)", "ftp://c",
    "http://c:4317\n", "http://user@c", "http://-c", "c:4317",
]
SERVED_NAMES: list[Any] = [
    "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "m:latest", "<b>x</b>", "a b", "a\u0007", "a\nb", "",
    "-x", "x" * 256, "x" * 257, "'x'",
]
NAMES: list[Any] = ["a", "a-b", "a.b", "x" * 63, "x" * 64, "a-"]


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


def _doc(kind: str, name: str = "x") -> dict[str, Any]:
    return {"apiVersion": "kvfleet.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            **copy.deepcopy(BASES[kind])}


def random_quantities(n: int, seed: int = 17) -> list[str]:
    """Strings over the quantity alphabet: mostly near-misses of the grammar."""
    rng = random.Random(seed)
    alphabet = "0123456789" * 3 + ".+-eEinumkKMGTP "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(n)]


def cases(random_count: int = 150) -> list[tuple[str, dict[str, Any]]]:
    """(id, object) pairs; ids say which class and value."""
    out: list[tuple[str, dict[str, Any]]] = []

    def add(cls: str, value: Any, doc: dict[str, Any]) -> None:
        out.append((f"{cls}:{value!r}"[:120], doc))

    fleet = _doc("InferenceFleet")
    for v in QUANTITY_VALUES + random_quantities(random_count):
        add("cpu", v, _set(fleet, (*ENGINE, "resources", "requests", "cpu"), v))
    for v in QUANTITY_VALUES:
        add("gpu", v, _set(fleet, (*ENGINE, "resources", "requests", "nvidia.com/gpu"), v))
        add("memory-limit", v, _set(fleet, (*ENGINE, "resources", "limits", "memory"), v))
    for req, lim in [("1", "2"), ("2", "1"), ("16Gi", "8000Mi"), ("1Gi", "1024Mi"), (2, "2000m"), ("1", 1)]:
        add("request<=limit", (req, lim), _set(fleet, (*ENGINE, "resources"),
                                               {"requests": {"cpu": req}, "limits": {"cpu": lim}}))
    for req, lim in [(1, 1), (1, 2), ("1", 1), ("1", "1000m"), (2, "2.0")]:
        add("gpu-limit=request", (req, lim), _set(fleet, (*ENGINE, "resources"),
                                                  {"requests": {"nvidia.com/gpu": req},
                                                   "limits": {"nvidia.com/gpu": lim}}))
    for name in ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu", "amd.com/gpu", "hugepages-2Mi", "pods"]:
        add("resource-name", name, _set(fleet, (*ENGINE, "resources", "requests", name), "1"))
    for key in KEYS:
        add("annotation-key", key, _set(fleet, ("spec", "podAnnotations"), {key: "v"}))
        add("role-annotation-key", key, _set(fleet, (*ENGINE, "podAnnotations"), {key: "v"}))
        add("node-selector-key", key, _set(fleet, (*ENGINE, "placement", "nodeSelector"), {key: "v"}))
        add("toleration-key", key, _set(fleet, (*ENGINE, "placement", "tolerations"), [{"key": key}]))
    for value in LABEL_VALUES:
        add("node-selector-value", value, _set(fleet, (*ENGINE, "placement", "nodeSelector"), {"k": value}))
    add("annotation-value-long", 9000, _set(fleet, ("spec", "podAnnotations"), {"a": "x" * 9000}))
    for tol in [{"key": "k", "operator": "Exists", "value": "v"}, {"key": "k", "tolerationSeconds": 5},
                {"key": "k", "effect": "NoExecute", "tolerationSeconds": 5},
                {"key": "k", "effect": "NoExecute", "tolerationSeconds": -1}]:
        add("toleration", tol, _set(fleet, (*ENGINE, "placement", "tolerations"), [tol]))
    for image in IMAGES:
        add("image", image, _set(fleet, ("spec", "image"), image))
    for url in ENDPOINTS:
        add("otlp", url, _set(fleet, ("spec", "telemetry", "otlpEndpoint"), url))
    for seqs, tokens in [(64, 64), (128, 64), (64, 2048), (4096, 4096)]:
        add("budget", (seqs, tokens), _set(fleet, ENGINE, {"maxNumSeqs": seqs, "maxNumBatchedTokens": tokens}))
    for p, d, r in [((1, 1), (4, 8), (0.5, 2)), ((1, 4), (2, 8), (0.25, 2)), ((1, 1), (0, 0), (1, 2)),
                    ((8, 8), (1, 1), (0.25, 4)), ((2, 2), (1, 1), (0.25, 2)), ((0, 4), (1, 4), (2, 4))]:
        topo = {"mode": "disaggregated", "prefill": {"minReplicas": p[0], "maxReplicas": p[1]},
                "decode": {"minReplicas": d[0], "maxReplicas": d[1]}}
        doc = _set(_set(fleet, ("spec", "topology"), topo), ("spec", "autoscaling", "ratio"),
                   {"minPrefillPerDecode": r[0], "maxPrefillPerDecode": r[1]})
        add("ratio", (p, d, r), doc)
        add("ratio-autoscaling-off", (p, d, r), _set(doc, ("spec", "autoscaling", "enabled"), False))
    for cost in [0, 2.5, 1000, 1001, -1, "2.5"]:
        add("gpu-cost", cost, _set(fleet, ("spec", "gpuHourCostUsd"), cost))
    for n in [1, 1000, 1001, 1.0, "2", True]:
        add("replicas", n, _set(fleet, (*ENGINE, "maxReplicas"), n))

    mv = _doc("ModelVariant")
    for path in HOST_PATHS:
        add("hostPath", path, _set(mv, ("spec", "base"), {"hostPath": path}))
    ft = {"type": "full", "weights": {"pvc": {"claimName": "c"}}}
    for sub in SUB_PATHS:
        add("subPath", sub, _set(_set(mv, ("spec", "fineTune"), ft), ("spec", "fineTune", "weights", "pvc", "subPath"),
                                 sub))
    for claim in CLAIM_NAMES:
        add("claimName", claim, _set(mv, ("spec", "base"), {"pvc": {"claimName": claim}}))
    for served in SERVED_NAMES:
        add("servedModelName", served, _set(mv, ("spec", "servedModelName"), served))
    for sharing in [{"mode": "none", "fromVariant": "b"}, {"mode": "none", "recomputeLayers": [1]},
                    {"mode": "auto", "fromVariant": "b", "recomputeLayers": [1]},
                    {"mode": "auto", "fromVariant": "b", "maxRecomputeFraction": 0.5},
                    {"mode": "manual", "fromVariant": "b", "recomputeLayers": [1], "maxRecomputeFraction": 0.5},
                    {"mode": "manual", "fromVariant": "b", "recomputeLayers": [1024]},
                    {"mode": "none", "maxRecomputeFraction": 0.25}, {"mode": "manual", "fromVariant": "b",
                                                                      "recomputeLayers": [0, 1]}]:
        add("kvSharing", sharing, _set(mv, ("spec", "kvSharing"), sharing))
    for name in NAMES:
        for kind in BASES:
            add(f"name-{kind}", name, {**_doc(kind), "metadata": {"name": name}})

    slo = _doc("SLOClass")
    for ttft in [100, "100", 100.0, 1.5, True, -1, 600001]:
        add("ttftMs", ttft, _set(slo, ("spec", "ttftMs"), ttft))
    for pin in [{"enabled": False, "maxPinnedBytes": 10}, {"enabled": True, "maxPinnedBytes": 2**40 + 1},
                {"enabled": True, "maxPinnedBytes": 1024}]:
        add("kvPinning", pin, _set(slo, ("spec", "kvPinning"), pin))
    for ms in [1, 600000, 600001]:
        add("maxQueueMs", ms, _set(_set(slo, ("spec", "sheddable"), True), ("spec", "maxQueueMs"), ms))

    policy = _doc("CachePolicy")
    for pool in [{"enabled": True, "capacityBytes": 2**46}, {"enabled": True, "capacityBytes": 2**46 + 1},
                 {"enabled": True, "capacityBytes": 2**63 - 1}, {"enabled": False, "capacityBytes": 5},
                 {"enabled": True, "capacityBytes": "1Gi"}, {"enabled": True, "capacityBytes": 1.0}]:
        add("pool", pool, _set(policy, ("spec", "pool"), pool))
    for prefix in [{"enabled": False, "scope": "family"}, {"enabled": False}, {"enabled": True, "scope": "family"}]:
        add("prefixCache", prefix, _set(policy, ("spec", "prefixCache"), prefix))
    for eviction in [{"policy": "none", "pyramid": True}, {"policy": "h2o", "budgetTokens": 100, "pyramid": True}]:
        add("pyramid", eviction, _set(policy, ("spec", "eviction"), eviction))
    for eviction in [{"policy": "lookahead", "budgetRatio": 0.7}, {"policy": "snapkv", "budgetRatio": 0.7,
                                                                   "lookaheadDir": "/models/la"},
                     {"policy": "lookahead", "budgetRatio": 0.7, "lookaheadDir": "/models/la"},
                     {"policy": "lookahead", "budgetRatio": 0.7, "lookaheadDir": "models/la"},
                     {"policy": "lookahead", "budgetRatio": 0.7, "lookaheadDir": "/models/../la"}]:
        add("lookahead", eviction, _set(policy, ("spec", "eviction"), eviction))
    for quant in [{"dtype": "int4", "rotateKeys": True}, {"dtype": "fp8", "rotateKeys": True},
                  {"dtype": "none", "rotateKeys": True}, {"dtype": "int4", "keysPreRope": True}]:
        add("rotateKeys", quant, _set(policy, ("spec", "quantization"), quant))
        add("lookahead-quant", quant, _set(_set(policy, ("spec", "quantization"), quant), ("spec", "eviction"),
                                           {"policy": "lookahead", "budgetRatio": 0.7, "lookaheadDir": "/la"}))
    for block in [16, 16.0, "16", 17]:
        add("blockSizeTokens", block, _set(policy, ("spec", "blockSizeTokens"), block))
    for budget in [100, 1048576, 1048577]:
        add("budgetTokens", budget, _set(policy, ("spec", "eviction"), {"policy": "h2o", "budgetTokens": budget}))
    return out
