"""Admission rules that hold in the operator too: paths, keys, quantities, names, field paths, hardening.

The API server's side of the same rules is proven in tests/operator/api/test_crd_vs_pydantic_k8s.py
(and examples/invalid in e2e/tests/test_examples.py); these run without a cluster.
"""

from __future__ import annotations

import copy
from decimal import Decimal

import pytest
from kvfleet.dataplane.config import ConfigError
from kvfleet.operator.api import ModelVariant
from kvfleet.operator.api.common import KubeModel, Resource
from kvfleet.operator.api.shapes import quantity, under_prefix
from kvfleet.operator.api.validate import InvalidResource, parse
from kvfleet.operator.builders import OperatorSettings, desired_objects
from kvfleet.operator.builders.pods import CONTAINER_SECURITY, POD_SECURITY
from kvfleet.operator.resolve import Unresolved, resolve
from op_testlib import chat_fleet, colocated, inputs, objects_by_key


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1), ("1.5Gi", Decimal(3 * 2**29)), ("500m", Decimal("0.5")), ("1e3", 1000), ("1E", 10**18),
     ("+1", 1), (".5", Decimal("0.5")), ("1.", 1), ("1000m", 1), ("8Ei", 8 * 2**60), ("3u", Decimal("0.000003"))],
)
def test_quantity_values(text, value):
    assert quantity(text) == value


@pytest.mark.parametrize("text", ["1.2.3Gi", "-1", ".", "+", "1K", "1ki", "1 Gi", " 1", "1\n", "", "1e", "0x10",
                                  "1mi", "1e99999999999"])
def test_not_quantities(text):
    with pytest.raises(ValueError):
        quantity(text)


def _all_models(cls=KubeModel):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_models(sub)


def test_every_rule_on_a_spec_or_resource_names_its_field():
    """Rules on nested objects point at that object already; on a spec or a resource they must say where."""
    unnamed = [
        (m.__name__, r.message)
        for m in _all_models()
        for r in m.__dict__.get("__rules__", ())
        if not r.field_path and (issubclass(m, Resource) or m.__name__.endswith("Spec"))
    ]
    assert not unnamed


def _variant_with_host_path(path: str) -> dict[tuple[str, str], dict]:
    objects = copy.deepcopy(objects_by_key())
    objects[("ModelVariant", "smollm2-base")]["spec"]["base"] = {"hostPath": path}
    return objects


def test_host_path_is_refused_unless_below_an_allowed_prefix():
    objects = _variant_with_host_path("/models/smollm2")
    lookup = lambda k, n: objects.get((k, n))  # noqa: E731
    refused = resolve(chat_fleet(), lookup, OperatorSettings())
    assert isinstance(refused, Unresolved) and refused.reason == "HostPathNotAllowed"
    assert "/models/smollm2" in refused.message and "none (the default)" in refused.message
    sibling = resolve(chat_fleet(), lookup, OperatorSettings(host_path_prefixes=("/mod",)))
    assert isinstance(sibling, Unresolved), "a prefix matches whole path segments only"
    allowed = resolve(chat_fleet(), lookup, OperatorSettings(host_path_prefixes=("/models/",)))
    assert not isinstance(allowed, Unresolved)
    volumes = [v for o in desired_objects(allowed) if o["kind"] == "Deployment"
               for v in o["spec"]["template"]["spec"]["volumes"] if "hostPath" in v]
    assert volumes and all(v["hostPath"] == {"path": "/models/smollm2", "type": "Directory"} for v in volumes)


def test_builders_refuse_a_host_path_even_when_resolve_is_bypassed():
    objects = _variant_with_host_path("/models/smollm2")
    built = inputs(objects=objects, settings=OperatorSettings(host_path_prefixes=("/models",)))
    unsafe = type(built)(**{**built.__dict__, "settings": OperatorSettings()})
    with pytest.raises(ConfigError, match="hostPath"):
        desired_objects(unsafe)


def test_under_prefix_is_segment_wise():
    assert under_prefix("/models/a", ("/models",)) and under_prefix("/models", ("/models/",))
    assert not under_prefix("/models2/a", ("/models",)) and not under_prefix("/a", ())


@pytest.mark.parametrize("claim", ["weights.team-a", "a" * 253])
def test_pvc_claim_names_are_dns_subdomains(claim):
    doc = {"kind": "ModelVariant", "metadata": {"name": "m"},
           "spec": {"family": "f", "base": {"pvc": {"claimName": claim, "subPath": "models/llama-3"}}}}
    assert isinstance(parse(doc), ModelVariant)


@pytest.mark.parametrize("key", [
    "container.apparmor.security.beta.kubernetes.io/engine", "seccomp.security.alpha.kubernetes.io/pod",
    "kubernetes.io/psp", "pod-security.kubernetes.io/enforce", "node.k8s.io/x", "io.kubernetes.cri-o.Devices",
    "io.katacontainers.config.hypervisor.x", "run.oci.keep_original_groups", "bad key", "a/b/c",
])
@pytest.mark.parametrize("where", ["fleet", "role"])
def test_reserved_or_invalid_annotation_keys_are_refused(key, where):
    fleet = chat_fleet()
    target = fleet["spec"] if where == "fleet" else fleet["spec"]["topology"]["decode"]
    target["podAnnotations"] = {key: "unconfined"}
    with pytest.raises(InvalidResource, match="podAnnotations"):
        parse(fleet)


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_every_pod_is_hardened_whatever_the_fleet_says(topology):
    fleet = chat_fleet()
    fleet["spec"]["podAnnotations"] = {"prometheus.io/scrape": "true", "kvfleet.io/run-locally": "true"}
    if topology == "colocated":
        fleet = colocated(fleet)
    objs = [o for o in desired_objects(inputs(fleet)) if "template" in o.get("spec", {})]
    assert len(objs) >= 3
    for obj in objs:
        template = obj["spec"]["template"]
        spec = template["spec"]
        assert spec["securityContext"] == POD_SECURITY
        # only the router reads the API (its own ServiceAccount, a Role that lists pods: discovery)
        router = obj["metadata"]["name"] == "chat-router"
        assert spec["automountServiceAccountToken"] is router
        assert spec.get("serviceAccountName") == ("chat-router" if router else None)
        assert not {"hostNetwork", "hostPID", "hostIPC"} & spec.keys()
        for c in spec["containers"]:
            assert c["securityContext"] == CONTAINER_SECURITY
        for key in template["metadata"]["annotations"]:
            assert "kubernetes.io" not in key and "k8s.io" not in key
    assert POD_SECURITY["seccompProfile"] == {"type": "RuntimeDefault"}
    assert CONTAINER_SECURITY == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                  "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
