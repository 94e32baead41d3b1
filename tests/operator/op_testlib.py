"""Shared test data: the examples as dicts, and FleetInputs built from them (no cluster)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from kvfleet.operator.builders import FleetInputs, OperatorSettings
from kvfleet.operator.resolve import resolve

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
EXAMPLE_FILES = ("01-modelvariants.yaml", "02-sloclasses.yaml", "03-cachepolicy.yaml", "04-fleet.yaml")


def example_docs() -> list[dict[str, Any]]:
    return [d for f in EXAMPLE_FILES for d in yaml.safe_load_all((EXAMPLES / f).read_text())]


def objects_by_key() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in example_docs()}


def chat_fleet(namespace: str = "ml", uid: str = "uid-chat", generation: int = 1) -> dict[str, Any]:
    fleet = copy.deepcopy(objects_by_key()[("InferenceFleet", "chat")])
    fleet["metadata"].update(namespace=namespace, uid=uid, generation=generation)
    return fleet


def colocated(fleet: dict[str, Any], engine: dict[str, Any] | None = None) -> dict[str, Any]:
    fleet = copy.deepcopy(fleet)
    topo = fleet["spec"]["topology"]
    topo["engine"] = engine or topo["decode"]
    topo["mode"] = "colocated"
    del topo["prefill"], topo["decode"]
    return fleet


def inputs(fleet: dict[str, Any] | None = None, objects: dict[tuple[str, str], dict[str, Any]] | None = None,
           settings: OperatorSettings | None = None) -> FleetInputs:
    objects = objects if objects is not None else objects_by_key()
    result = resolve(fleet or chat_fleet(), lambda k, n: objects.get((k, n)),
                     settings or OperatorSettings(image="kvfleet:test", otlp_endpoint="http://kvfleet-otlp.sys.svc:4317"))
    assert isinstance(result, FleetInputs), result
    return result
