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

from .shapes import (
    DNS_LABEL,
    GPU,
    LABEL_VALUE,
    MAX_ANNOTATION_VALUE,
    MAX_MAP_KEYS,
    NON_NEGATIVE_QUANTITY,
    QUALIFIED_KEYS,
    QUALIFIED_NAME,
    QUALIFIED_NAME_LENGTHS,
    QUANTITY_PATTERN,
    RESOURCE_LIMITS,
    UNRESERVED_ANNOTATION_KEYS,
    FieldRule,
    cel_quote,
    is_qualified_name,
    quantity,
    search,
)

GROUP = "kvfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A Kubernetes name (RFC 1123 DNS label). Every kvfleet object's own name is one too (see NAME_RULE):
# names end up in child object names, label values and Service names.
NAME_PATTERN = DNS_LABEL
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
        # NOTE: the API server cannot point a rule into metadata (its schema is implicit there); such
        # rules name the field in their message, and pydantic still reports the path.
        if self.field_path and not self.field_path.startswith(".metadata."):
            out["fieldPath"] = self.field_path
        return out


class RuleViolation(ValueError):
    """Raised by a model whose `Rule` does not hold; carries the rule for its field path."""

    def __init__(self, rule: Rule):
        super().__init__(rule.message)
        self.rule = rule


class KubeModel(BaseModel):
    """Base for every spec/status fragment: camelCase on the wire, no unknown keys."""

    # strict: no coercion ("1" is not 1, 1.0 is not 1, true is not "true"), as the API server's schema.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        strict=True,
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
            [
                core_schema.int_schema(strict=True),
                core_schema.str_schema(strict=True, pattern=QUANTITY_PATTERN, max_length=64),
            ]
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN, "maxLength": 64}


Quantity = Annotated[int | str, IntOrString, NON_NEGATIVE_QUANTITY]
QualifiedName = Annotated[
    str,
    Field(max_length=317),
    FieldRule(
        cel=f"self.matches({cel_quote(QUALIFIED_NAME)}) && self.matches({cel_quote(QUALIFIED_NAME_LENGTHS)})",
        message="must be a Kubernetes qualified name ([DNS-subdomain prefix/]name)",
        check=is_qualified_name,
    ),
]


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

    key: QualifiedName | None = Field(
        default=None, description="Taint key the toleration applies to; empty matches all keys."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="Taint value to match when operator is Equal.",
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        le=31536000,
        description="For NoExecute: how long the pod stays bound after the taint appears.",
    )

    __rules__ = (
        Rule(
            cel="(has(self.effect) && self.effect == 'NoExecute') || !has(self.tolerationSeconds)",
            message="tolerationSeconds applies only to effect NoExecute",
            check=lambda s: s.effect == "NoExecute" or s.toleration_seconds is None,
            field_path=".tolerationSeconds",
        ),
        Rule(
            cel="self.operator == 'Equal' || !has(self.value)",
            message="value applies only to operator Equal",
            check=lambda s: s.operator == "Equal" or s.value is None,
            field_path=".value",
        ),
    )


class Placement(KubeModel):
    """Where a role's pods may run."""

    node_selector: Annotated[
        dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]], QUALIFIED_KEYS
    ] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels a pod requires (e.g. nvidia.com/gpu.product); keys are label keys, "
        "values label values.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Taints the pods tolerate (e.g. a dedicated GPU pool).",
    )
    spread_across_zones: bool = Field(
        default=False, description="Spread replicas across topology.kubernetes.io/zone (soft constraint)."
    )


def _q(text: str) -> str:
    return f"quantity(string({text}))"


_KNOWN = "[" + ", ".join(cel_quote(k) for k in RESOURCE_LIMITS) + "]"
_MAXIMA = "{" + ", ".join(f"{cel_quote(k)}: quantity({cel_quote(v)})" for k, v in RESOURCE_LIMITS.items()) + "}"
_LIMITS_DOC = ", ".join(f"{k} {v}" for k, v in RESOURCE_LIMITS.items())


def _amounts_rules(field: str, attr: str) -> tuple[Rule, ...]:
    """Known resource names, whole GPUs and upper bounds for one of requests/limits."""
    # `isQuantity` guards keep these rules quiet about values the per-value rule already refuses.
    ok = f"!isQuantity(string(self.{field}[k]))"
    return (
        Rule(
            cel=f"self.{field}.all(k, k in {_KNOWN})",
            message=f"{field}: unknown resource name (known: {', '.join(RESOURCE_LIMITS)})",
            check=lambda s: all(k in RESOURCE_LIMITS for k in getattr(s, attr)),
            field_path=f".{field}",
        ),
        Rule(
            # Written as an integer: CEL's isInteger() refuses "1000m" and "1.0", which Kubernetes takes.
            cel=f"!('{GPU}' in self.{field}) || string(self.{field}['{GPU}']).matches({cel_quote(WHOLE)})",
            message=f"{field}: {GPU} must be a whole number of GPUs, written as an integer (1, \"2\")",
            check=lambda s: GPU not in getattr(s, attr) or search(WHOLE, str(getattr(s, attr)[GPU])),
            field_path=f".{field}",
        ),
        Rule(
            cel=f"self.{field}.all(k, !(k in {_KNOWN}) || {ok} || "
            f"{_q(f'self.{field}[k]')}.compareTo({_MAXIMA}[k]) <= 0)",
            message=f"{field}: above the largest amount a pod may ask for ({_LIMITS_DOC})",
            check=lambda s: all(
                k not in RESOURCE_LIMITS or _below(v, RESOURCE_LIMITS[k]) for k, v in getattr(s, attr).items()
            ),
            field_path=f".{field}",
        ),
    )


def _valid(v: Any) -> bool:
    try:
        quantity(v)
    except ValueError:
        return False
    return True


def _below(v: Any, bound: str) -> bool:
    return not _valid(v) or quantity(v) <= quantity(bound)


def _cmp(a: Any, b: Any) -> int:
    """-1/0/1 comparing two quantities (0 when either is not one: the per-value rule refuses it)."""
    if not (_valid(a) and _valid(b)):
        return 0
    qa, qb = quantity(a), quantity(b)
    return (qa > qb) - (qa < qb)


WHOLE = "^[0-9]+$"
Amounts = Annotated[dict[str, Quantity], Field(max_length=8)]


class Resources(KubeModel):
    """Compute resources per pod (core/v1 ResourceRequirements).

    Names: cpu, memory, ephemeral-storage and nvidia.com/gpu (whole GPUs). Upper bounds per pod:
    cpu 256, memory 4Ti, ephemeral-storage 16Ti, nvidia.com/gpu 16. Every request is <= its limit.
    """

    requests: Amounts = Field(
        default_factory=dict,
        description='Requested resources, e.g. {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1}.',
    )
    limits: Amounts = Field(
        default_factory=dict, description="Resource limits; nvidia.com/gpu limits must equal requests."
    )

    __rules__ = (
        *_amounts_rules("requests", "requests"),
        *_amounts_rules("limits", "limits"),
        Rule(
            cel="self.requests.all(k, !(k in self.limits) || !isQuantity(string(self.requests[k])) "
            "|| !isQuantity(string(self.limits[k])) || "
            "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
            message="every request must be <= its limit",
            check=lambda s: all(k not in s.limits or _cmp(v, s.limits[k]) <= 0 for k, v in s.requests.items()),
            field_path=".requests",
        ),
        Rule(
            cel=f"!('{GPU}' in self.limits) || !('{GPU}' in self.requests) "
            f"|| !isQuantity(string(self.requests['{GPU}'])) || !isQuantity(string(self.limits['{GPU}'])) "
            f"|| quantity(string(self.limits['{GPU}'])).compareTo(quantity(string(self.requests['{GPU}']))) == 0",
            message="nvidia.com/gpu limits must equal requests",
            check=lambda s: GPU not in s.limits or GPU not in s.requests or _cmp(s.limits[GPU], s.requests[GPU]) == 0,
            field_path=".limits",
        ),
    )


def _ints(data: Any) -> Any:
    if isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(data, dict):
        return {k: _ints(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_ints(v) for v in data]
    return data


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

    @model_validator(mode="before")
    @classmethod
    def _integral_floats_are_ints(cls, data: Any) -> Any:
        """What the API server stores: JSON numbers without a fraction are integers (1.0 -> 1).

        `kubectl apply` sends YAML's 1.0 as 1, and the schema takes 1.0 for an integer field;
        pydantic (strict) then sees what the server keeps. 1.5 stays a float and "1" a string.
        """
        return _ints(data)

    api_version: Literal["kvfleet.io/v1alpha1"] = Field(
        default="kvfleet.io/v1alpha1", description=API_VERSION
    )
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")


# Every kvfleet object's name is a DNS label: fleets reference objects by DNS-label names, and names
# become child names, label values and Service names. (The API server alone would allow dots.)
NAME_RULE = Rule(
    cel=f"self.metadata.name.matches({cel_quote(DNS_LABEL)}) && size(self.metadata.name) <= 63",
    message="metadata.name must be a DNS label (<= 63 characters of a-z, 0-9 and '-'; no dots): "
    "kvfleet names become Service names and label values",
    check=lambda s: search(DNS_LABEL, s.metadata.name) and len(s.metadata.name) <= 63,
    field_path=".metadata.name",
)

# Annotations a fleet adds to its pods: qualified keys, none in the reserved namespaces.
PodAnnotations = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_ANNOTATION_VALUE)]],
    Field(max_length=MAX_MAP_KEYS),
    QUALIFIED_KEYS,
    UNRESERVED_ANNOTATION_KEYS,
]
