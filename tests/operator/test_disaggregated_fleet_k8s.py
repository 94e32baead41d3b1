"""A disaggregated fleet that really serves (the tiny model, then the real SmolLM2): the operator renders
router, prefill and decode Deployments,
the pod runner runs each role as a real process on its pod IP, the router finds its prefill and decode
pods from the API under its own ServiceAccount, and the `openai` SDK gets answers through the router.

The router's ServiceAccount is least privilege, proved with its own token on the real API server:
it may list its namespace's pods and nothing else (no Secrets, no other namespace)."""

from __future__ import annotations

import json

import openai
import pytest
from k8s_testlib import apply_doc, wait_for

from e2e.harness import serving_pod_ips, token_kubeconfig
from e2e.nodes import GPU_TOLERATION

pytestmark = pytest.mark.k8s

ROLE_SPEC = {"minReplicas": 1, "maxReplicas": 2, "maxNumSeqs": 4,
             "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
             "placement": {"tolerations": [GPU_TOLERATION]}}


def _ips(cluster, namespace: str, role: str, port: int) -> list[str]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", "-l",
                                      f"kvfleet.io/fleet=split,kvfleet.io/role={role}").stdout)["items"]
    return serving_pod_ips(pods, port=port)


def _can(cluster, kubeconfig, *args: str) -> bool:
    r = cluster.kubectl("--kubeconfig", str(kubeconfig), "auth", "can-i", *args, check=False)
    return r.stdout.strip() == "yes"


@pytest.mark.parametrize("builtin", ["tiny-llama", pytest.param("smollm2-135m-instruct", marks=pytest.mark.slow)])
def test_disaggregated_fleet_serves_through_its_router(operator_env, podrunner, tmp_path, builtin):
    env = operator_env
    apply_doc(env.cluster, env.namespace, {
        "apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": "tiny"},
        "spec": {"family": "tiny", "base": {"builtin": builtin}, "servedModelName": "tiny", "dtype": "float32"},
    })
    apply_doc(env.cluster, env.namespace, {
        "apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet", "metadata": {"name": "split"},
        "spec": {
            "variants": [{"name": "tiny"}],
            "sloClasses": ["interactive"],
            "podAnnotations": {"kvfleet.io/run-locally": "true"},
            "router": {"placement": {"tolerations": [GPU_TOLERATION]}},
            "topology": {"mode": "disaggregated", "prefill": ROLE_SPEC, "decode": ROLE_SPEC},
        },
    })
    for role, port in (("prefill", 8080), ("decode", 8080), ("router", 8000)):
        wait_for(f"a {role} pod serving", lambda r=role, p=port: _ips(env.cluster, env.namespace, r, p), timeout=300)
    (router_ip,) = _ips(env.cluster, env.namespace, "router", 8000)
    client = openai.OpenAI(base_url=f"http://{router_ip}:8000/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    def answered():
        try:
            return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, temperature=0)
        except openai.APIStatusError:
            return None  # the router has not discovered a ready decode pod yet (429)

    reply = wait_for("an answer through the router", answered, timeout=60)
    assert reply.choices[0].finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 6
    if builtin != "tiny-llama":  # the real model, through router -> prefill -> KV transfer -> decode
        r = client.chat.completions.create(model="tiny", temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
    stream = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)

    # least privilege: the router's own token, judged by the API server's authorizer
    ns = env.namespace
    token = env.cluster.kubectl("create", "token", "split-router", "-n", ns).stdout.strip()
    kc = token_kubeconfig(env.cluster.kubeconfig, token, tmp_path / "router.kubeconfig")
    assert _can(env.cluster, kc, "list", "pods", "-n", ns) and _can(env.cluster, kc, "watch", "pods", "-n", ns)
    assert not _can(env.cluster, kc, "get", "secrets", "-n", ns)
    assert not _can(env.cluster, kc, "delete", "pods", "-n", ns)
    assert not _can(env.cluster, kc, "list", "pods", "-n", "default")
