"""A fleet that really serves: operator -> engine Deployment -> pod on a GPU node -> a local engine process
(the pod runner) -> the `openai` SDK. Then a replica change through the fleet spec adds a second server."""

from __future__ import annotations

import json

import openai
import pytest
from k8s_testlib import apply_doc, wait_for

from e2e.harness import serving_pod_ips
from e2e.nodes import GPU_TOLERATION

pytestmark = pytest.mark.k8s

def _serving_ips(cluster, namespace: str, fleet: str) -> list[str]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json", "-l",
                                      f"kvfleet.io/fleet={fleet},kvfleet.io/role=engine").stdout)["items"]
    return serving_pod_ips(pods)


def test_colocated_fleet_of_a_builtin_model_serves_openai_requests_and_scales(operator_env, podrunner):
    env = operator_env
    apply_doc(env.cluster, env.namespace, {
        "apiVersion": "kvfleet.io/v1alpha1", "kind": "ModelVariant", "metadata": {"name": "tiny"},
        "spec": {"family": "tiny", "base": {"builtin": "tiny-llama"}, "servedModelName": "tiny", "dtype": "float32"},
    })
    fleet = {
        "apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet", "metadata": {"name": "live"},
        "spec": {
            "variants": [{"name": "tiny"}],
            "sloClasses": ["interactive"],
            "router": {"placement": {"tolerations": [GPU_TOLERATION]}},
            "topology": {"mode": "colocated", "engine": {
                "minReplicas": 1, "maxReplicas": 2, "replicas": 1, "maxNumSeqs": 4,
                "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
                "placement": {"tolerations": [GPU_TOLERATION]},
                "podAnnotations": {"kvfleet.io/run-locally": "true"},
            }},
        },
    }
    apply_doc(env.cluster, env.namespace, fleet)
    ips = wait_for("an engine pod serving", lambda: _serving_ips(env.cluster, env.namespace, "live"), timeout=240)
    client = openai.OpenAI(base_url=f"http://{ips[0]}:8080/v1", api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 5

    fleet["spec"]["topology"]["engine"]["replicas"] = 2
    apply_doc(env.cluster, env.namespace, fleet)
    ips = wait_for("two engine pods serving",
                   lambda: r if len(r := _serving_ips(env.cluster, env.namespace, "live")) == 2 else None,
                   timeout=240)
    for ip in ips:
        c = openai.OpenAI(base_url=f"http://{ip}:8080/v1", api_key="x", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
