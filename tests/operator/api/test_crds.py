"""The generated CRDs: no drift from the models, structural, documented, and accepting the examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kvfleet.operator.api import KIND_BY_NAME, KINDS
from kvfleet.operator.api.crdgen import filename, openapi_schema, render

ROOT = Path(__file__).resolve().parents[3]
CRD_DIRS = [ROOT / "crds", ROOT / "charts" / "kvfleet" / "crds"]


@pytest.mark.parametrize("crd_dir", CRD_DIRS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_generated_crds_match_the_models(kind, crd_dir):
    path = crd_dir / filename(kind)
    assert path.exists(), f"{path} missing: run `make crds`"
    assert path.read_text() == render(kind), f"{path} drifted from operator/api: run `make crds`"


def test_no_stray_crd_files():
    expected = {filename(k) for k in KINDS}
    for crd_dir in CRD_DIRS:
        assert {p.name for p in crd_dir.glob("*.yaml")} == expected


def _walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_every_field_has_a_description(kind):
    schema = openapi_schema(kind)
    missing = [
        path
        for path, node in _walk(schema)
        if path and path != ".metadata" and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert not missing, f"fields without description: {missing}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_schema_is_structural(kind):
    forbidden = {"$ref", "$defs", "title", "allOf", "oneOf", "not"}
    for path, node in _walk(openapi_schema(kind)):
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        assert "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if node.get("default") is None:
            assert "default" not in node, f"{path}: null default"


def test_crds_carry_names_columns_status_and_cel():
    fleet = yaml.safe_load(render(KIND_BY_NAME["InferenceFleet"]))
    names = fleet["spec"]["names"]
    assert names["shortNames"] == ["fleet"] and names["categories"] == ["kvfleet"]
    version = fleet["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Mode", "Prefill", "Decode", "Attainment", "KV", "Age"} <= columns
    rules = [
        r["rule"]
        for _, node in _walk(version["schema"]["openAPIV3Schema"])
        for r in node.get("x-kubernetes-validations", [])
    ]
    assert any("minReplicas <= self.maxReplicas" in r for r in rules)
    assert {k.short_names[0] for k in KINDS} == {"mv", "slo", "kvp", "fleet"}


def _example_docs():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield pytest.param(doc, id=f"{path.name}:{doc['metadata']['name']}")


@pytest.mark.parametrize("doc", list(_example_docs()))
def test_examples_validate_against_the_generated_schema(doc):
    """JSON-schema check of the CRD schema (CEL is checked by the real API server in e2e)."""
    schema = openapi_schema(KIND_BY_NAME[doc["kind"]])
    # OpenAPI v3.0 schemas follow draft 4 semantics (e.g. exclusiveMinimum is a flag next to minimum).
    jsonschema.Draft4Validator(schema).validate(doc)


def test_schema_rejects_wrong_types():
    schema = openapi_schema(KIND_BY_NAME["SLOClass"])
    with pytest.raises(jsonschema.ValidationError, match="ttftMs|'fast' is not of type"):
        jsonschema.Draft4Validator(schema).validate({"kind": "SLOClass", "spec": {"ttftMs": "fast", "tpotMs": 1}})
