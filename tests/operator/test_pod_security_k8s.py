"""Every pod the builders render is admitted in a namespace that enforces Pod Security "restricted".

The pods are created for real on the local kube-apiserver (its PodSecurity admission plugin), from
the pod templates of a disaggregated fleet (prefill, decode, memory pool, router) and a colocated
one, with pass-through fields set (annotations, node selectors, tolerations). A weakened copy is
refused in the same namespace, which proves the enforcement is live.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from kvfleet.operator.builders import OperatorSettings, desired_objects
from op_testlib import chat_fleet, colocated, inputs, objects_by_key

pytestmark = pytest.mark.k8s

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest",
              "pod-security.kubernetes.io/warn": "restricted",
              "pod-security.kubernetes.io/warn-version": "latest"}


@pytest.fixture
def restricted_ns(cluster: Any, namespace: str) -> str:
    cluster.kubectl("label", "namespace", namespace, *[f"{k}={v}" for k, v in RESTRICTED.items()])
    deadline = time.monotonic() + 60  # pods are admitted once the default ServiceAccount exists
    while cluster.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode != 0:
        assert time.monotonic() < deadline, "no default ServiceAccount"
        time.sleep(0.2)
    return namespace


def pods_of(objects: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """One Pod per rendered workload: the template's metadata and spec, as its controller would create it."""
    pods = []
    for obj in objects:
        template = obj.get("spec", {}).get("template")
        if template is None:
            continue
        meta = copy.deepcopy(template["metadata"])
        meta.update(name=f"{obj['metadata']['name']}-pss"[:63], namespace=namespace)
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template["spec"])})
    return pods


def fleet_with_pass_through(namespace: str) -> dict[str, Any]:
    fleet = chat_fleet(namespace=namespace)
    fleet["spec"]["podAnnotations"] = {"prometheus.io/scrape": "true", "example.com/team": "ml"}
    decode = fleet["spec"]["topology"]["decode"]
    decode["podAnnotations"] = {"sidecar.example.com/inject": "false"}
    decode["placement"]["nodeSelector"] = {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    return fleet


def create(cluster: Any, pod: dict[str, Any]) -> Any:
    return cluster.kubectl("create", "-f", "-", input=json.dumps(pod), check=False)


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_rendered_pods_meet_the_restricted_standard(cluster: Any, restricted_ns: str, topology: str) -> None:
    fleet = fleet_with_pass_through(restricted_ns)
    if topology == "colocated":
        fleet = colocated(fleet)
    desired = desired_objects(inputs(fleet))
    for sa in (o for o in desired if o["kind"] == "ServiceAccount"):  # the router's, which its pod names
        body = {"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": sa["metadata"]["name"], "namespace": restricted_ns}}
        cluster.kubectl("create", "-f", "-", input=json.dumps(body))
    pods = pods_of(desired, restricted_ns)
    roles = {p["metadata"]["labels"]["kvfleet.io/role"] for p in pods}
    assert roles >= ({"router", "mempool"} | ({"engine"} if topology == "colocated" else {"prefill", "decode"}))
    for pod in pods:
        proc = create(cluster, pod)
        assert proc.returncode == 0, f"{pod['metadata']['name']} refused:\n{proc.stderr}"
        assert "Warning" not in proc.stderr, proc.stderr
    names = cluster.kubectl("get", "pods", "-n", restricted_ns, "-o", "name").stdout.split()
    assert len(names) == len(pods)


WEAKENINGS = {
    "privilege escalation": lambda p: p["spec"]["containers"][0]["securityContext"].update(
        allowPrivilegeEscalation=True),
    "root": lambda p: p["spec"]["securityContext"].update(runAsNonRoot=False, runAsUser=0),
    "capabilities": lambda p: p["spec"]["containers"][0]["securityContext"].update(capabilities={"add": ["NET_RAW"]}),
    "seccomp unconfined": lambda p: p["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    "apparmor annotation": lambda p: p["metadata"]["annotations"].update(
        {f"container.apparmor.security.beta.kubernetes.io/{p['spec']['containers'][0]['name']}": "unconfined"}),
}


@pytest.mark.parametrize("how", list(WEAKENINGS))
def test_a_weakened_pod_is_refused_there(cluster: Any, restricted_ns: str, how: str) -> None:
    """The control: the namespace really enforces, so the admitted pods really comply."""
    pod = next(p for p in pods_of(desired_objects(inputs(chat_fleet(namespace=restricted_ns))), restricted_ns)
               if p["metadata"]["labels"]["kvfleet.io/role"] == "decode")
    WEAKENINGS[how](pod)
    proc = create(cluster, pod)
    assert proc.returncode != 0 and 'violates PodSecurity "restricted:latest"' in proc.stderr, proc.stderr


def test_host_path_weights_are_not_restricted(cluster: Any, restricted_ns: str) -> None:
    """Why hostPath is off by default: a hostPath volume is outside "restricted" (and "baseline")."""
    objects = copy.deepcopy(objects_by_key())
    objects[("ModelVariant", "smollm2-base")]["spec"]["base"] = {"hostPath": "/models/smollm2"}
    settings = OperatorSettings(image="kvfleet:test", host_path_prefixes=("/models",))
    built = desired_objects(inputs(chat_fleet(namespace=restricted_ns), objects, settings))
    pod = next(p for p in pods_of(built, restricted_ns) if any("hostPath" in v for v in p["spec"]["volumes"]))
    proc = create(cluster, pod)
    assert proc.returncode != 0 and "hostPath" in proc.stderr, proc.stderr
