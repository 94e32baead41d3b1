"""The pydantic models: valid examples parse, invalid ones fail with field paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kvfleet.operator.api import CachePolicy, InferenceFleet, ModelVariant, SLOClass
from kvfleet.operator.api.validate import InvalidResource, parse
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))


def _expectations(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("# expect-"):
            key, _, value = line[2:].partition(":")
            out[key.strip()] = value.strip()
    return out


def test_examples_exist():
    assert len(EXAMPLES) >= 4 and len(INVALID) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_valid_examples_parse(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs
    for doc in docs:
        obj = parse(doc)
        # round trip: the wire form parses back to an equal object
        assert type(obj).model_validate(obj.to_k8s()) == obj


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_fail_with_field_path(path: Path):
    expect = _expectations(path)
    assert {"expect-error", "expect-path"} <= expect.keys(), f"{path.name} lacks expect-* comments"
    with pytest.raises(InvalidResource) as info:
        parse(yaml.safe_load(path.read_text()))
    errors = info.value.errors
    assert any(e.path == expect["expect-path"] for e in errors), errors
    assert any(expect["expect-error"] in str(e) for e in errors), errors
    assert expect["expect-path"] in str(info.value)


def _fleet(**topology):
    return {
        "apiVersion": "kvfleet.io/v1alpha1",
        "kind": "InferenceFleet",
        "metadata": {"name": "f"},
        "spec": {"variants": [{"name": "v"}], "topology": topology},
    }


def test_defaults_fill_in():
    fleet = parse(_fleet(mode="colocated", engine={}))
    assert isinstance(fleet, InferenceFleet)
    engine = fleet.spec.topology.engine
    assert engine is not None and (engine.min_replicas, engine.max_replicas, engine.replicas) == (1, 1, None)
    assert fleet.spec.autoscaling.enabled and fleet.spec.router.port == 8000
    policy = parse({"kind": "CachePolicy", "metadata": {"name": "p"}, "spec": {}})
    assert isinstance(policy, CachePolicy)
    assert policy.spec.block_size_tokens == 16 and policy.spec.quantization.dtype == "none"


def test_camel_case_on_the_wire_snake_case_in_python():
    slo = SLOClass.model_validate({"metadata": {"name": "x"}, "spec": {"ttftMs": 100, "tpotMs": 20}})
    assert slo.spec.ttft_ms == 100
    wire = slo.to_k8s()
    assert wire["spec"]["ttftMs"] == 100 and "ttft_ms" not in wire["spec"]
    assert wire["apiVersion"] == "kvfleet.io/v1alpha1" and wire["kind"] == "SLOClass"


@pytest.mark.parametrize(
    ("quantization", "ok"),
    [
        ({"dtype": "fp8"}, True),
        ({"dtype": "fp8", "keyGranularity": "per-head"}, True),
        ({"dtype": "fp8", "valueGranularity": "per-token"}, True),
        ({"dtype": "fp8", "valueGranularity": "per-channel"}, False),
        ({"dtype": "int4", "groupSize": 32}, True),
        ({"dtype": "int4", "groupSize": 33}, False),
        ({"dtype": "int8", "keyGranularity": "per-tensor"}, False),
        ({"dtype": "none", "residualTokens": 8}, False),
        ({"dtype": "int8", "residualTokens": 8, "sinkTokens": 4}, True),
        ({"dtype": "int2", "groupSize": 32, "residualTokens": 32, "sinkTokens": 4}, True),
        ({"dtype": "int3", "keysPreRope": True}, True),
        ({"dtype": "int2", "keyGranularity": "per-head"}, False),
        ({"dtype": "int3", "groupSize": 33}, False),
        ({"dtype": "int1"}, False),
    ],
)
def test_quantization_rules(quantization, ok):
    doc = {"kind": "CachePolicy", "metadata": {"name": "p"}, "spec": {"quantization": quantization}}
    if ok:
        parse(doc)
    else:
        with pytest.raises(InvalidResource, match="spec.quantization"):
            parse(doc)


def test_pinned_replicas_must_lie_within_bounds():
    with pytest.raises(InvalidResource, match=r"spec.topology.engine.replicas: replicas must lie within"):
        parse(_fleet(mode="colocated", engine={"minReplicas": 1, "maxReplicas": 2, "replicas": 5}))
    parse(_fleet(mode="colocated", engine={"minReplicas": 1, "maxReplicas": 5, "replicas": 5}))


def test_exactly_one_weights_source():
    base = {"family": "f", "base": {}}
    with pytest.raises(ValidationError, match="exactly one of builtin, hostPath or pvc"):
        ModelVariant.model_validate({"metadata": {"name": "m"}, "spec": base})
    with pytest.raises(InvalidResource, match="spec.base: exactly one"):
        parse({"kind": "ModelVariant", "metadata": {"name": "m"}, "spec": base})
    parse(
        {
            "kind": "ModelVariant",
            "metadata": {"name": "m"},
            "spec": {"family": "f", "base": {"pvc": {"claimName": "c"}}},
        }
    )


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(InvalidResource, match="unknown kind 'Deployment'"):
        parse({"kind": "Deployment", "metadata": {"name": "d"}})
