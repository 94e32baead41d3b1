"""Names, labels and hashes shared by every builder (pure, no I/O)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

FIELD_MANAGER = "kvfleet-operator"
MANAGED_BY = "kvfleet-operator"

LABEL_FLEET = "kvfleet.io/fleet"
LABEL_ROLE = "kvfleet.io/role"
LABEL_VARIANT = "kvfleet.io/variant"
ANNOTATION_CONFIG_HASH = "kvfleet.io/config-hash"
ANNOTATION_ADAPTERS = "kvfleet.io/adapters"  # on an engine workload: the LoRA variants its pods serve (a,b)
# Planner decisions per workload (JSON {"<variant>/<role>": replicas}); the builders clamp them to min..max.
ANNOTATION_PLANNED_REPLICAS = "kvfleet.io/planned-replicas"

ENGINE_ROLES = ("prefill", "decode", "engine")
MAX_NAME = 63  # DNS-1123 label: Services and label values must fit


def child_name(*parts: str) -> str:
    """`fleet-variant-role`, shortened with a stable hash suffix when it would exceed 63 characters.

    Services need DNS-1123 labels (63), and pod names derive from Deployment names,
    so every child name is kept to a label's length.
    """
    name = "-".join(p for p in parts if p)
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"


def selector_labels(fleet: str, role: str, variant: str | None = None) -> dict[str, str]:
    """The immutable selector of one workload: fleet + role (+ variant for per-variant roles)."""
    labels = {LABEL_FLEET: fleet, LABEL_ROLE: role}
    if variant:
        labels[LABEL_VARIANT] = variant
    return labels


def labels(fleet: str, role: str | None = None, variant: str | None = None, version: str = "") -> dict[str, str]:
    """Every label a child object carries: the kvfleet selector labels plus app.kubernetes.io/*."""
    out = {
        "app.kubernetes.io/name": "kvfleet",
        "app.kubernetes.io/instance": fleet,
        "app.kubernetes.io/part-of": "kvfleet",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_FLEET: fleet,
    }
    if role:
        out["app.kubernetes.io/component"] = role
        out[LABEL_ROLE] = role
    if variant:
        out[LABEL_VARIANT] = variant
    if version:
        out["app.kubernetes.io/version"] = version
    return out


def config_hash(*data: dict[str, Any]) -> str:
    """A short, stable digest of rendered config (sorted JSON), stamped into pod templates to roll pods."""
    digest = hashlib.sha256()
    for item in data:
        digest.update(json.dumps(item, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:16]


def owner_reference(fleet: dict[str, Any]) -> dict[str, Any]:
    """The controller owner reference to an InferenceFleet (garbage collection deletes children with it)."""
    meta = fleet["metadata"]
    return {
        "apiVersion": fleet.get("apiVersion", "kvfleet.io/v1alpha1"),
        "kind": "InferenceFleet",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
