"""The four kvfleet resources (group kvfleet.io, version v1alpha1) as pydantic models.

These models are the one source of truth: the operator validates with them and
`crdgen` generates the CRDs (schemas, CEL rules, printer columns) from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cachepolicy import CachePolicy, CachePolicySpec
from .common import API_VERSION, GROUP, VERSION, Condition, Resource, Rule
from .fleet import InferenceFleet, InferenceFleetSpec
from .modelvariant import ModelVariant, ModelVariantSpec
from .sloclass import SLOClass, SLOClassSpec


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Kind:
    """How one resource is presented by the API server."""

    model: type[Resource]
    plural: str
    singular: str
    short_names: tuple[str, ...]
    columns: tuple[PrinterColumn, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.model.model_fields["kind"].default  # type: ignore[no-any-return]


def _condition(type_: str) -> str:
    return f'.status.conditions[?(@.type=="{type_}")].status'


KINDS: tuple[Kind, ...] = (
    Kind(
        ModelVariant,
        "modelvariants",
        "modelvariant",
        ("mv",),
        (
            PrinterColumn("Family", ".spec.family"),
            PrinterColumn("Fine-tune", ".spec.fineTune.type"),
            PrinterColumn("Shares-KV-from", ".spec.kvSharing.fromVariant"),
            PrinterColumn("Available", _condition("Available")),
        ),
    ),
    Kind(
        SLOClass,
        "sloclasses",
        "sloclass",
        ("slo",),
        (
            PrinterColumn("TTFT-ms", ".spec.ttftMs", "integer"),
            PrinterColumn("TPOT-ms", ".spec.tpotMs", "integer"),
            PrinterColumn("Target", ".spec.attainmentTarget", "number"),
            PrinterColumn("Priority", ".spec.priority", "integer"),
            PrinterColumn("Sheddable", ".spec.sheddable", "boolean"),
        ),
    ),
    Kind(
        CachePolicy,
        "cachepolicies",
        "cachepolicy",
        ("kvp",),
        (
            PrinterColumn("KV-dtype", ".spec.quantization.dtype"),
            PrinterColumn("Eviction", ".spec.eviction.policy"),
            PrinterColumn("Prefix", ".spec.prefixCache.scope"),
            PrinterColumn("Pool", ".spec.pool.enabled", "boolean"),
        ),
    ),
    Kind(
        InferenceFleet,
        "inferencefleets",
        "inferencefleet",
        ("fleet",),
        (
            PrinterColumn("Mode", ".spec.topology.mode"),
            PrinterColumn("Available", _condition("Available")),
            PrinterColumn("Prefill", ".status.roles.prefill.ready", "integer", "Ready prefill replicas"),
            PrinterColumn("Decode", ".status.roles.decode.ready", "integer", "Ready decode replicas"),
            PrinterColumn("Engine", ".status.roles.engine.ready", "integer", "Ready colocated engines", 1),
            PrinterColumn("Attainment", ".status.attainment", "number", "Lowest SLO attainment over classes"),
            PrinterColumn("KV", ".status.kvPressure", "number", "Mean decode KV cache usage"),
        ),
    ),
)

KIND_BY_NAME = {k.name: k for k in KINDS}

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "KINDS",
    "KIND_BY_NAME",
    "Kind",
    "PrinterColumn",
    "Condition",
    "Resource",
    "Rule",
    "CachePolicy",
    "CachePolicySpec",
    "InferenceFleet",
    "InferenceFleetSpec",
    "ModelVariant",
    "ModelVariantSpec",
    "SLOClass",
    "SLOClassSpec",
]
