"""Building blocks shared by the four kvfleet resources.

Every model here is the one source of both Python validation and the CRD
schema (see `crdgen.py`). Cross-field rules are declared once as `Rule`s: a
CEL expression for the API server and the equivalent Python predicate for the
operator, side by side, so the two cannot silently drift (the e2e suite checks
that the API server and pydantic reject the same invalid examples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

GROUP = "kvfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A Kubernetes name (RFC 1123 DNS subdomain label as used for object names).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, stated for the API server (CEL) and for Python.

    `check` receives the model instance and must return True when valid; it
    must mean exactly what `cel` means (defaults are applied in both worlds).
    `field_path` (relative, e.g. ".minReplicas") points the API server's error
    at a field.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None

    def as_k8s(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


class RuleViolation(ValueError):
    """Raised by a model whose `Rule` does not hold; carries the rule for its field path."""

    def __init__(self, rule: Rule):
        super().__init__(rule.message)
        self.rule = rule


class KubeModel(BaseModel):
    """Base for every spec/status fragment: camelCase on the wire, no unknown keys."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    # Rules declared on a class apply to that class only (not to subclasses).
    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> KubeModel:
        for rule in type(self).__dict__.get("__rules__", ()):
            if not rule.check(self):
                raise RuleViolation(rule)
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        rules = cls.__dict__.get("__rules__", ())
        if rules:
            target = handler.resolve_ref_schema(json_schema)
            target["x-kubernetes-validations"] = [r.as_k8s() for r in rules]
        return json_schema

    def to_k8s(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class IntOrString:
    """A Kubernetes quantity such as `1`, `"500m"` or `"16Gi"` (x-kubernetes-int-or-string)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.union_schema(
            [core_schema.int_schema(ge=0), core_schema.str_schema(pattern=QUANTITY_PATTERN)]
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}


QUANTITY_PATTERN = r"^([+]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
Quantity = Annotated[int | str, IntOrString]


class Condition(KubeModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(description="Condition type: Available, Progressing or Degraded (CamelCase).")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(default="", description="One CamelCase word saying why (e.g. MissingReference).")
    message: str = Field(default="", description="A human-readable explanation, with what to do about it.")
    last_transition_time: str | None = Field(
        default=None, description="RFC 3339 time the status last flipped (not merely re-reported)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation of the spec this condition was computed from."
    )


class ReferencedStatus(KubeModel):
    """Status of a resource that fleets reference (ModelVariant, SLOClass, CachePolicy)."""

    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Available / Degraded conditions.")
    used_by_fleets: list[str] = Field(
        default_factory=list, description="InferenceFleets in this namespace that reference this object."
    )


class Toleration(KubeModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(
        default=None, description="Taint key the toleration applies to; empty matches all keys."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class Placement(KubeModel):
    """Where a role's pods may run."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a pod requires (e.g. nvidia.com/gpu.product)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Taints the pods tolerate (e.g. a dedicated GPU pool).",
    )
    spread_across_zones: bool = Field(
        default=False, description="Spread replicas across topology.kubernetes.io/zone (soft constraint)."
    )


class Resources(KubeModel):
    """Compute resources per pod (core/v1 ResourceRequirements)."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description='Requested resources, e.g. {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1}.',
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="Resource limits; nvidia.com/gpu limits must equal requests."
    )


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; everything else passes through."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resource(KubeModel):
    """A whole custom resource object: apiVersion, kind, metadata, spec, status.

    Subclasses set `kind`, `spec` and `status`; `__rules__` on a subclass become
    root-level CEL rules (they may read `self.metadata.name`).
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["kvfleet.io/v1alpha1"] = Field(
        default="kvfleet.io/v1alpha1", description=API_VERSION
    )
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
