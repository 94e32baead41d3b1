"""Cross-variant KV reuse on the real local control plane: two LoRA siblings of the tiny base, a profile
measured by `kvfleet profile-sharing` applied from a ConfigMap (auto mode), a family-scope CachePolicy, a
disaggregated fleet (the prefill pod reuses the KV; the router of a colocated fleet does not route yet).
The `openai` SDK asks one sibling, then the other with the same long prompt; the second answer equals a
local engine applying the same plan, the router's counters show the first sibling's blocks were reused,
and the fleet's status says which sharing is in effect."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from k8s_testlib import apply_doc, greedy_completion, kube_for, wait_for

from e2e.harness import metric_value, serving_pod_ips
from e2e.nodes import GPU_TOLERATION

pytestmark = pytest.mark.k8s

ROLE = {"minReplicas": 1, "maxReplicas": 1, "maxNumSeqs": 4,
          "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
          "placement": {"tolerations": [GPU_TOLERATION]}}
PROMPT = ("The quick brown fox jumps over the lazy dog while the cat watches from the old stone wall, "
          "and then both of them wander off into the tall grass looking for something to eat before night")
CALIBRATION = " ".join(f"line {i}: the river runs past the mill and the miller counts {i * 7} sacks." for i in range(60))


def _ips(cluster, namespace: str, role: str, port: int) -> list[str]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", "-l",
                                      f"kvfleet.io/fleet=shared,kvfleet.io/role={role}").stdout)["items"]
    return serving_pod_ips(pods, port=port)


def _local(model_dir, adapters: dict[str, str], layers: tuple[int, ...]) -> str:
    """What one local engine applying the same plan answers for `support` after `legal` cached the prompt."""
    from kvfleet.dataplane.config import AdapterConfig, EngineConfig, KVShareConfig
    from kvfleet.dataplane.engine.api import SamplingParams
    from kvfleet.dataplane.engine.llm_engine import LLMEngine
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    cfg = EngineConfig(model_dir=str(model_dir), variant="base", block_size=16, max_num_seqs=4,
                       adapters=tuple(AdapterConfig(n, d) for n, d in adapters.items()),
                       kv_sharing=(KVShareConfig("support", "legal", layers),))
    engine, tok = LLMEngine.from_config(cfg), Tokenizer.from_dir(str(model_dir))
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.generate([tok.encode(PROMPT)], sp, variant="legal")
    out = engine.generate([tok.encode(PROMPT)], sp, variant="support")[0]
    assert engine.stats().shared_prefix_tokens > 0
    return tok.decode(out.new_token_ids)


def test_a_profiled_sibling_reuses_the_others_kv_through_the_router(operator_env, podrunner, tmp_path):
    from kvfleet.dataplane.kvsharing import SharingProfile
    from kvfleet.dataplane.model.builtin import builtin_model_dir
    from kvfleet.dataplane.model.tiny import write_random_lora

    ns, cluster = operator_env.namespace, operator_env.cluster
    base_dir = builtin_model_dir("tiny-llama")
    adapters = {name: str(write_random_lora(tmp_path / "adapters" / name, base_dir, rank=4, alpha=8.0, seed=20 + i))
                for i, name in enumerate(("legal", "support"))}
    (tmp_path / "calibration.txt").write_text(CALIBRATION)
    subprocess.run([sys.executable, "-m", "kvfleet", "profile-sharing", "--base", str(base_dir),
                    "--from", adapters["legal"], "--to", adapters["support"], "--from-variant", "legal",
                    "--to-variant", "support", "--family", "tiny", "--calibration", str(tmp_path / "calibration.txt"),
                    "--out", str(tmp_path / "profile.json"), "--max-fraction", "0.5",
                    "--prompt-tokens", "32", "--continuation-tokens", "8", "--max-prompts", "2",
                    "--budget", "10"],  # random tiny adapters: any plan passes; this test is about the path
                   check=True, timeout=300)
    profile = SharingProfile.from_json((tmp_path / "profile.json").read_text())
    layers = profile.plan(0.5).layers
    cluster.kubectl("create", "configmap", "support-profile", "-n", ns,
                    f"--from-file=profile.json={tmp_path / 'profile.json'}")
    pv = f"shared-adapters-{ns}"
    cluster.core.create_persistent_volume({
        "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "hostPath": {"path": str(tmp_path / "adapters")}, "claimRef": {"namespace": ns, "name": "shared"}}})
    kube = kube_for(cluster.kubeconfig)
    try:
        cluster.core.create_namespaced_persistent_volume_claim(ns, {
            "metadata": {"name": "shared"},
            "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        apply_doc(cluster, ns, {"apiVersion": "kvfleet.io/v1alpha1", "kind": "CachePolicy",
                                "metadata": {"name": "family"}, "spec": {"prefixCache": {"scope": "family"}}})
        sharing = {"legal": {}, "support": {"kvSharing": {"mode": "auto", "fromVariant": "legal",
                                                         "maxRecomputeFraction": 0.5,
                                                         "profile": {"configMap": "support-profile"}}}}
        for name, extra in sharing.items():
            apply_doc(cluster, ns, {
                "apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": name},
                "spec": {"family": "tiny", "base": {"builtin": "tiny-llama"}, "dtype": "float32", **extra,
                         "fineTune": {"type": "lora", "loraRank": 4, "loraAlpha": 8,
                                      "weights": {"pvc": {"claimName": "shared", "subPath": name}}}}})
        apply_doc(cluster, ns, {
            "apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet", "metadata": {"name": "shared"},
            "spec": {"variants": [{"name": "legal"}, {"name": "support"}], "cachePolicy": "family",
                     "sloClasses": ["interactive"], "podAnnotations": {"kvfleet.io/run-locally": "true"},
                     "router": {"placement": {"tolerations": [GPU_TOLERATION]}},
                     "topology": {"mode": "disaggregated", "prefill": ROLE, "decode": ROLE}}})
        status = wait_for("the fleet status to report the sharing", lambda: (
            kube.get("InferenceFleet", ns, "shared").get("status") or {}).get("kvSharing"), timeout=60)
        assert status == [{"variant": "support", "fromVariant": "legal", "inEffect": True,
                           "recomputeLayers": list(layers), "source": "profile support-profile/profile.json",
                           "pplIncrease": round(profile.plan(0.5).ppl_increase, 6)}]
        for role, port in (("prefill", 8080), ("decode", 8080), ("router", 8000)):
            wait_for(f"a {role} pod serving", lambda r=role, p=port: _ips(cluster, ns, r, p), timeout=300)
        (router_ip,) = _ips(cluster, ns, "router", 8000)
        client = openai.OpenAI(base_url=f"http://{router_ip}:8000/v1", api_key="x", max_retries=0, timeout=60)

        def ask(model: str) -> str | None:
            return greedy_completion(client, model, PROMPT)

        wait_for("an answer from legal", lambda: ask("legal"), timeout=60)
        got = ask("support")
        assert got == _local(base_dir, adapters, layers)

        wait_for("the router's counters to show legal's blocks reused by support", lambda: metric_value(
            f"http://{router_ip}:8000", "kvfleet_shared_prefix_tokens_total") > 0, timeout=30)
    finally:
        kube.close()
        cluster.core.delete_persistent_volume(pv)
