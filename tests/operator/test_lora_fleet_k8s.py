"""A disaggregated fleet of a base and two LoRA variants on the real local control plane: the operator
renders ONE set of base prefill/decode pods serving both adapters, the pod runner runs every role as a
real process (adapters read from a PVC bound to a hostPath PV), and the `openai` SDK gets each variant's
own greedy answer through the router, equal to a local engine serving the same adapter."""

from __future__ import annotations

import json

import openai
import pytest
from k8s_testlib import apply_doc, greedy_completion, wait_for

from e2e.harness import serving_pod_ips
from e2e.nodes import GPU_TOLERATION

pytestmark = pytest.mark.k8s

ROLE = {"minReplicas": 1, "maxReplicas": 1, "maxNumSeqs": 4,
        "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
        "placement": {"tolerations": [GPU_TOLERATION]}}
PROMPT = "Hello there, how"


def _ips(cluster, namespace: str, role: str, port: int) -> list[str]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", "-l",
                                      f"kvfleet.io/fleet=lora,kvfleet.io/role={role}").stdout)["items"]
    return serving_pod_ips(pods, port=port)


def _local_greedy(model_dir, adapters: dict[str, str]) -> dict[str, str]:
    """What one local engine serving the base and the adapters answers (the reference)."""
    from kvfleet.dataplane.config import AdapterConfig, EngineConfig
    from kvfleet.dataplane.engine.api import GenerationRequest, SamplingParams
    from kvfleet.dataplane.engine.llm_engine import LLMEngine
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    cfg = EngineConfig(model_dir=str(model_dir), variant="base", block_size=16, max_num_seqs=4,
                       adapters=tuple(AdapterConfig(n, d) for n, d in adapters.items()))
    engine, tok = LLMEngine.from_config(cfg), Tokenizer.from_dir(str(model_dir))
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    out = {}
    for i, variant in enumerate(["base", *adapters]):
        engine.add_request(GenerationRequest(f"r{i}", tok.encode(PROMPT), sp, variant=variant))
        toks: list[int] = []
        while engine.has_unfinished():
            for o in engine.step():
                toks += o.new_token_ids
        out[variant] = tok.decode(toks)
    return out


def test_two_lora_variants_ride_on_one_set_of_base_pods(operator_env, podrunner, tmp_path):
    from kvfleet.dataplane.model.builtin import builtin_model_dir
    from kvfleet.dataplane.model.tiny import write_random_lora

    env, ns = operator_env, operator_env.namespace
    base_dir = builtin_model_dir("tiny-llama")
    for i, name in enumerate(("legal", "support")):
        write_random_lora(tmp_path / "adapters" / name, base_dir, rank=4, alpha=8.0, seed=10 + i)
    pv = f"lora-adapters-{ns}"
    env.cluster.core.create_persistent_volume({
        "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "hostPath": {"path": str(tmp_path / "adapters")}, "claimRef": {"namespace": ns, "name": "lora-adapters"}}})
    try:
        env.cluster.core.create_namespaced_persistent_volume_claim(ns, {
            "metadata": {"name": "lora-adapters"},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        apply_doc(env.cluster, ns, {
            "apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": "base"},
            "spec": {"family": "tiny", "base": {"builtin": "tiny-llama"}, "servedModelName": "tiny",
                     "dtype": "float32"}})
        for name in ("legal", "support"):
            apply_doc(env.cluster, ns, {
                "apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": name},
                "spec": {"family": "tiny", "base": {"builtin": "tiny-llama"}, "dtype": "float32",
                         "fineTune": {"type": "lora", "loraRank": 4, "loraAlpha": 8,
                                      "weights": {"pvc": {"claimName": "lora-adapters", "subPath": name}}}}})
        apply_doc(env.cluster, ns, {
            "apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet", "metadata": {"name": "lora"},
            "spec": {"variants": [{"name": "base"}, {"name": "legal"}, {"name": "support"}],
                     "sloClasses": ["interactive"], "podAnnotations": {"kvfleet.io/run-locally": "true"},
                     "router": {"placement": {"tolerations": [GPU_TOLERATION]}},
                     "topology": {"mode": "disaggregated", "prefill": ROLE, "decode": ROLE}}})
        for role, port in (("prefill", 8080), ("decode", 8080), ("router", 8000)):
            wait_for(f"a {role} pod serving", lambda r=role, p=port: _ips(env.cluster, ns, r, p), timeout=300)
        deployments = json.loads(env.cluster.kubectl("get", "deployments", "-n", ns, "-o", "json", "-l",
                                                     "kvfleet.io/fleet=lora").stdout)["items"]
        assert sorted(d["metadata"]["name"] for d in deployments) == [
            "lora-base-decode", "lora-base-prefill", "lora-router"]  # one set of base pods for all three
        (router_ip,) = _ips(env.cluster, ns, "router", 8000)
        client = openai.OpenAI(base_url=f"http://{router_ip}:8000/v1", api_key="x", max_retries=0, timeout=60)
        models = {m.id: getattr(m, "parent", None) for m in client.models.list().data}
        assert models == {"tiny": None, "legal": "tiny", "support": "tiny"}

        def ask(model: str) -> str | None:
            return greedy_completion(client, model, PROMPT)

        got = {v: wait_for(f"an answer from {v}", lambda m=m: ask(m), timeout=60)
               for v, m in (("base", "tiny"), ("legal", "legal"), ("support", "support"))}
        want = _local_greedy(base_dir, {"legal": str(tmp_path / "adapters" / "legal"),
                                        "support": str(tmp_path / "adapters" / "support")})
        assert got == want
        assert len(set(got.values())) == 3, got  # each adapter answers its own way
    finally:
        env.cluster.core.delete_persistent_volume(pv)
