"""Resolve an InferenceFleet's references into builder inputs (pure: the lookup is injected).

A missing or invalid reference is not an exception for the operator: it becomes
`Unresolved`, which the reconciler turns into `Degraded=True` with the reason
and message below, while the last applied children keep serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kvfleet.operator.api import CachePolicy, CachePolicySpec, InferenceFleet, ModelVariant, SLOClass
from kvfleet.operator.api.shapes import under_prefix
from kvfleet.operator.api.validate import InvalidResource, parse

from .builders import FleetInputs, OperatorSettings
from .builders.names import ANNOTATION_PLANNED_REPLICAS
from .builders.serving import is_lora, serving_groups, unservable
from .sharing import sharing_plans, split_pairs

# (kind, name) -> the object's body in the fleet's namespace, or None when it does not exist.
Lookup = Callable[[str, str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Ref:
    """One object a fleet references."""

    kind: str  # ModelVariant, CachePolicy or SLOClass
    name: str


@dataclass(frozen=True)
class Unresolved:
    """Why a fleet cannot be rendered now: a condition reason and a message saying what to do."""

    reason: str  # InvalidSpec, MissingReference, InvalidReference, HostPathNotAllowed, InvalidKVSharing
    message: str


def references(spec: Mapping[str, Any]) -> list[Ref]:
    """Every object a fleet spec (raw dict) names; tolerant of invalid specs (used to index fleets)."""
    refs = [Ref("ModelVariant", v["name"]) for v in spec.get("variants") or () if isinstance(v, dict) and "name" in v]
    if spec.get("cachePolicy"):
        refs.append(Ref("CachePolicy", str(spec["cachePolicy"])))
    refs += [Ref("SLOClass", str(c)) for c in spec.get("sloClasses") or ()]
    return refs


def clean(body: Mapping[str, Any]) -> dict[str, Any]:
    """What pydantic should see: apiVersion, kind, the metadata it knows, spec (status is ours)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion", "kvfleet.io/v1alpha1"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "generation", "uid", "labels", "annotations")
                     if k in meta},
        "spec": body.get("spec") or {},
    }


def planned_replicas(fleet_body: Mapping[str, Any]) -> dict[str, int]:
    """The planner's decisions from the fleet's annotation (ignored when malformed)."""
    raw = ((fleet_body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_PLANNED_REPLICAS)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def host_paths(variant: ModelVariant) -> list[str]:
    """The node directories a variant's weights come from (base and fine-tune)."""
    sources = [variant.spec.base] + ([variant.spec.fine_tune.weights] if variant.spec.fine_tune else [])
    return [s.host_path for s in sources if s.host_path]


def resolve(fleet_body: Mapping[str, Any], lookup: Lookup, settings: OperatorSettings) -> FleetInputs | Unresolved:
    """Parse the fleet and fetch what it references; the first problems found are reported together."""
    try:
        fleet = parse(clean(fleet_body))
    except InvalidResource as exc:
        return Unresolved("InvalidSpec", f"the fleet spec is invalid: {exc}")
    assert isinstance(fleet, InferenceFleet)
    missing: list[str] = []
    invalid: list[str] = []

    def fetch(kind: str, name: str) -> Any:
        body = lookup(kind, name)
        if body is None:
            missing.append(f"{kind} {name!r}")
            return None
        try:
            return parse(clean(body))
        except InvalidResource as exc:
            invalid.append(str(exc))
            return None

    variants = [fetch("ModelVariant", v.name) for v in fleet.spec.variants]
    policy = fetch("CachePolicy", fleet.spec.cache_policy) if fleet.spec.cache_policy else None
    classes = [fetch("SLOClass", c) for c in fleet.spec.slo_classes]
    ns = fleet_body["metadata"].get("namespace") or "default"
    if missing:
        return Unresolved(
            "MissingReference",
            f"{', '.join(missing)} not found in namespace {ns}; create it (or remove it from the fleet). "
            "Already running children are kept as they were.",
        )
    if invalid:
        return Unresolved("InvalidReference", "; ".join(invalid))
    refused = [
        f"ModelVariant {v.metadata.name!r} mounts hostPath {path!r}"
        for v in variants
        if isinstance(v, ModelVariant)
        for path in host_paths(v)
        if not under_prefix(path, settings.host_path_prefixes)
    ]
    unserved = unservable(tuple(v for v in variants if isinstance(v, ModelVariant)))
    unserved += [f"variants[{i}].preload: ModelVariant {ref.name!r} is not a LoRA adapter (only adapters are "
                 "loaded on demand; its own weights load at start anyway)"
                 for i, (ref, v) in enumerate(zip(fleet.spec.variants, variants, strict=True))
                 if ref.preload and isinstance(v, ModelVariant) and not is_lora(v)]
    if unserved:
        return Unresolved("UnservableVariant", "; ".join(unserved) + ". Nothing of this fleet is rendered until "
                          "it is fixed; already running children are kept as they were.")
    if refused:
        allowed = ", ".join(settings.host_path_prefixes) or "none (the default)"
        return Unresolved(
            "HostPathNotAllowed",
            f"{'; '.join(refused)}: this operator mounts node directories only at or below its allowed "
            f"prefixes ({allowed}; --allow-host-path-prefix). Use a PVC or ask the cluster admin.",
        )
    inputs = FleetInputs(
        fleet_body=fleet_body,
        fleet=fleet,
        variants=tuple(v for v in variants if isinstance(v, ModelVariant)),
        cache_policy=policy.spec if isinstance(policy, CachePolicy) else CachePolicySpec(),
        slo_classes=tuple(c for c in classes if isinstance(c, SLOClass)),
        settings=settings,
        planned=planned_replicas(fleet_body),
    )
    plans, rows, problems = sharing_plans(inputs.variants, inputs.cache_policy, lookup)
    problems += split_pairs(plans, serving_groups(inputs))
    if problems:
        return Unresolved("InvalidKVSharing", "; ".join(problems) + ". Nothing of this fleet is rendered until it "
                          "is fixed; already running children are kept as they were.")
    return replace(inputs, kv_sharing=tuple(plans), kv_sharing_status=tuple(rows))
