"""InferenceFleet: variants + cache policy + SLO classes -> prefill, decode, pool and router pods."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .common import (
    NAME_RULE,
    Condition,
    KubeModel,
    Name,
    Placement,
    PodAnnotations,
    Resource,
    Resources,
    Rule,
)
from .shapes import IMAGE_REFERENCE, OTLP_ENDPOINT, PORT_IN_RANGE

Role = Literal["prefill", "decode", "engine", "mempool", "router"]


class RoleSpec(KubeModel):
    """Replica bounds, resources and placement of one role's pods."""

    min_replicas: int = Field(default=1, ge=0, le=1000, description="Lower bound the autoscaler keeps.")
    max_replicas: int = Field(default=1, ge=0, le=1000, description="Upper bound the autoscaler keeps.")
    replicas: int | None = Field(
        default=None, ge=0, le=1000, description="Pin the replica count (disables autoscaling for this role)."
    )
    resources: Resources = Field(
        default_factory=Resources, description='Per-pod resources, e.g. requests {"nvidia.com/gpu": 1}.'
    )
    placement: Placement = Field(default_factory=Placement, description="Node selection and tolerations.")
    max_num_seqs: int = Field(
        default=64, ge=1, le=4096, description="Sequences batched together per engine step."
    )
    max_num_batched_tokens: int = Field(
        default=2048, ge=16, le=1048576, description="Token budget of one engine step (prefill chunk size)."
    )
    pod_annotations: PodAnnotations = Field(
        default_factory=dict,
        description="Extra annotations on this role's pods, on top of the fleet's podAnnotations (same rules).",
    )

    __rules__ = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="minReplicas must be <= maxReplicas",
            check=lambda s: s.min_replicas <= s.max_replicas,
            field_path=".minReplicas",
        ),
        Rule(
            cel="!has(self.replicas) || (self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas)",
            message="replicas must lie within minReplicas..maxReplicas",
            check=lambda s: s.replicas is None or s.min_replicas <= s.replicas <= s.max_replicas,
            field_path=".replicas",
        ),
        Rule(
            cel="self.maxNumBatchedTokens >= self.maxNumSeqs",
            message="maxNumBatchedTokens must be >= maxNumSeqs (a decode step needs one token per sequence)",
            check=lambda s: s.max_num_batched_tokens >= s.max_num_seqs,
            field_path=".maxNumBatchedTokens",
        ),
    )


class Topology(KubeModel):
    """Disaggregated (separate prefill and decode pods) or colocated (one engine does both)."""

    mode: Literal["disaggregated", "colocated"] = Field(
        default="disaggregated",
        description="disaggregated: prefill + decode roles; colocated: one engine role.",
    )
    prefill: RoleSpec | None = Field(default=None, description="Prefill pods (disaggregated mode).")
    decode: RoleSpec | None = Field(default=None, description="Decode pods (disaggregated mode).")
    engine: RoleSpec | None = Field(
        default=None, description="Engine pods doing both phases (colocated mode)."
    )

    __rules__ = (
        Rule(
            cel="self.mode != 'disaggregated' || (has(self.prefill) && has(self.decode) && !has(self.engine))",
            message="disaggregated mode needs prefill and decode and no engine",
            check=lambda s: (
                s.mode != "disaggregated"
                or (s.prefill is not None and s.decode is not None and s.engine is None)
            ),
            field_path=".mode",
        ),
        Rule(
            cel="self.mode != 'colocated' || (has(self.engine) && !has(self.prefill) && !has(self.decode))",
            message="colocated mode needs engine and no prefill or decode",
            check=lambda s: (
                s.mode != "colocated" or (s.engine is not None and s.prefill is None and s.decode is None)
            ),
            field_path=".mode",
        ),
    )


class MempoolSpec(KubeModel):
    """The KV memory pool role (runs when the cache policy enables the pool)."""

    replicas: int = Field(default=1, ge=1, le=64, description="Pool shards (a StatefulSet).")
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources (mostly memory).")
    placement: Placement = Field(default_factory=Placement, description="Node selection and tolerations.")


class RoutingSpec(KubeModel):
    """How the router picks a prefill pod for each request."""

    mode: Literal["round-robin", "load", "prefix"] = Field(
        default="prefix",
        description="prefix: the pod holding most of the prompt's leading KV blocks (from the pods' KV events), "
        "less its load; a saturated pod's prefix counts for nothing. load: the least loaded. round-robin: in turn.",
    )
    prefix_weight: float = Field(default=1.0, ge=0, le=100, description="prefix: weight of the share of prompt "
                                 "blocks a pod holds.")
    load_weight: float = Field(default=1.0, ge=0, le=100, description="prefix: weight of a pod's load "
                               "(requests in flight and waiting / its seats).")


class RouterSpec(KubeModel):
    """The fleet's OpenAI-compatible entry point."""

    replicas: int = Field(default=1, ge=1, le=100, description="Router pods.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of the router Service.")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Type of the router Service."
    )
    resources: Resources = Field(default_factory=Resources, description="Per-pod resources.")
    placement: Placement = Field(default_factory=Placement, description="Node selection and tolerations.")
    max_queued_requests: int = Field(
        default=256, ge=1, le=100000,
        description="Above this many queued requests, sheddable classes get HTTP 429.",
    )
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="How prefill pods are picked.")


class RatioBand(KubeModel):
    """Bounds on prefill replicas per decode replica."""

    min_prefill_per_decode: float = Field(
        default=0.25, gt=0, le=16, description="Lower bound of prefill/decode."
    )
    max_prefill_per_decode: float = Field(
        default=4.0, gt=0, le=16, description="Upper bound of prefill/decode."
    )

    __rules__ = (
        Rule(
            cel="self.minPrefillPerDecode <= self.maxPrefillPerDecode",
            message="minPrefillPerDecode must be <= maxPrefillPerDecode",
            check=lambda s: s.min_prefill_per_decode <= s.max_prefill_per_decode,
            field_path=".minPrefillPerDecode",
        ),
    )


class Autoscaling(KubeModel):
    """Trace-driven scaling: prefill on TTFT attainment, decode on TPOT attainment and KV pressure."""

    enabled: bool = Field(default=True, description="Let the operator set replicas within min..max.")
    interval_seconds: int = Field(default=15, ge=1, le=3600, description="How often the planner runs.")
    window_seconds: int = Field(
        default=60, ge=5, le=3600, description="Sliding window of traces the planner reads."
    )
    kv_pressure_high: float = Field(
        default=0.85, gt=0, le=1, description="Scale decode up above this KV usage."
    )
    kv_pressure_low: float = Field(
        default=0.4, ge=0, lt=1, description="Decode may scale down below this KV usage."
    )
    scale_down_stabilization_seconds: int = Field(
        default=300, ge=0, le=86400, description="A scale-down waits until the signal held this long."
    )
    drain_seconds: int = Field(
        default=30, ge=0, le=3600, description="Grace period for a pod to finish its in-flight requests."
    )
    ratio: RatioBand = Field(default_factory=RatioBand, description="Prefill:decode ratio band.")

    __rules__ = (
        Rule(
            cel="self.kvPressureLow < self.kvPressureHigh",
            message="kvPressureLow must be < kvPressureHigh",
            check=lambda s: s.kv_pressure_low < s.kv_pressure_high,
            field_path=".kvPressureLow",
        ),
    )


class Telemetry(KubeModel):
    """Where the fleet's OpenTelemetry traces go."""

    otlp_endpoint: Annotated[str, Field(max_length=2048, pattern=OTLP_ENDPOINT), PORT_IN_RANGE] | None = Field(
        default=None,
        description="The user's OTLP collector: http(s)://host[:port][/path], host a DNS name or an IP address.",
    )
    sampling_ratio: float = Field(
        default=1.0, ge=0, le=1, description="Fraction of requests traced for export."
    )


class VariantRef(KubeModel):
    """A ModelVariant served by the fleet."""

    name: Name = Field(description="ModelVariant name in the fleet's namespace.")
    preload: bool = Field(default=False, description="LoRA variants only: load the adapter when the pods start "
                          "instead of on its first request (a variant with its own weights is refused).")


def _lo(role: str) -> str:
    r = f"self.topology.{role}"
    return f"(has({r}.replicas) ? {r}.replicas : {r}.minReplicas)"


def _hi(role: str) -> str:
    r = f"self.topology.{role}"
    return f"(has({r}.replicas) ? {r}.replicas : {r}.maxReplicas)"


# The ratio band is the autoscaler's: it must be reachable by some prefill/decode counts within bounds
# (as real numbers; decode scaled to zero is exempt).
_RATIO_CEL = (
    "!self.autoscaling.enabled || self.topology.mode != 'disaggregated' || !has(self.topology.prefill) "
    f"|| !has(self.topology.decode) || {_hi('decode')} == 0 || ("
    f"self.autoscaling.ratio.minPrefillPerDecode * double({_lo('decode')} > 1 ? {_lo('decode')} : 1) "
    f"<= double({_hi('prefill')}) && double({_lo('prefill')}) "
    f"<= self.autoscaling.ratio.maxPrefillPerDecode * double({_hi('decode')}))"
)


def _bounds(spec: RoleSpec) -> tuple[int, int]:
    if spec.replicas is not None:
        return spec.replicas, spec.replicas
    return spec.min_replicas, spec.max_replicas


def _ratio_reachable(s: InferenceFleetSpec) -> bool:
    topo, ratio = s.topology, s.autoscaling.ratio
    if not s.autoscaling.enabled or topo.mode != "disaggregated" or topo.prefill is None or topo.decode is None:
        return True
    (p_lo, p_hi), (d_lo, d_hi) = _bounds(topo.prefill), _bounds(topo.decode)
    if d_hi == 0:
        return True
    return ratio.min_prefill_per_decode * max(d_lo, 1) <= p_hi and p_lo <= ratio.max_prefill_per_decode * d_hi


class InferenceFleetSpec(KubeModel):
    """Which variants to serve, how to cache, which SLO classes, and the shape of the fleet."""

    variants: list[VariantRef] = Field(
        min_length=1, max_length=16, description="ModelVariants served by this fleet."
    )
    cache_policy: Name | None = Field(default=None, description="CachePolicy name (default policy if unset).")
    slo_classes: list[Name] = Field(
        default_factory=list, max_length=16, description="SLOClass names this fleet serves."
    )
    default_slo_class: Name | None = Field(
        default=None, description="Class for requests that name none; must be one of sloClasses."
    )
    topology: Topology = Field(description="Disaggregated or colocated, with per-role settings.")
    mempool: MempoolSpec = Field(default_factory=MempoolSpec, description="The KV memory pool role.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="The OpenAI-compatible router.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Trace-driven autoscaling.")
    telemetry: Telemetry = Field(default_factory=Telemetry, description="Trace export.")
    gpu_hour_cost_usd: float = Field(
        default=0.0, ge=0, le=1000, description="Cost of one GPU-hour, for cost per Mtok."
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        pattern=IMAGE_REFERENCE,
        description="Override the kvfleet image for all roles: [registry[:port]/]path[:tag][@sha256:digest].",
    )
    pod_annotations: PodAnnotations = Field(
        default_factory=dict,
        description="Extra annotations on every pod of the fleet (e.g. for a service mesh or a scraper). Keys "
        "are qualified names; kubernetes.io, k8s.io (AppArmor, seccomp, ...) and container-runtime keys are "
        "refused, so no annotation can weaken the pods' security context.",
    )

    __rules__ = (
        Rule(
            cel="!has(self.defaultSloClass) || self.defaultSloClass in self.sloClasses",
            message="defaultSloClass must be one of sloClasses",
            check=lambda s: s.default_slo_class is None or s.default_slo_class in s.slo_classes,
            field_path=".defaultSloClass",
        ),
        Rule(
            cel="self.variants.all(v, self.variants.exists_one(w, w.name == v.name))",
            message="variants must be unique",
            check=lambda s: len({v.name for v in s.variants}) == len(s.variants),
            field_path=".variants",
        ),
        Rule(
            cel="self.sloClasses.all(c, self.sloClasses.exists_one(d, d == c))",
            message="sloClasses must be unique",
            check=lambda s: len(set(s.slo_classes)) == len(s.slo_classes),
            field_path=".sloClasses",
        ),
        Rule(
            cel=_RATIO_CEL,
            message="autoscaling.ratio cannot be met within the replica bounds: need "
            "minPrefillPerDecode * max(decode min replicas, 1) <= prefill max replicas and "
            "prefill min replicas <= maxPrefillPerDecode * decode max replicas (pinned replicas are both bounds)",
            check=lambda s: _ratio_reachable(s),
            field_path=".autoscaling.ratio",
        ),
    )


class RoleStatus(KubeModel):
    """Replicas of one role."""

    desired: int = Field(default=0, ge=0, description="Replicas the operator wants.")
    ready: int = Field(default=0, ge=0, description="Replicas ready to serve.")
    kv_pressure: float | None = Field(
        default=None, ge=0, le=1, description="Mean KV-cache usage of the role's pods (from their telemetry)."
    )


class RolesStatus(KubeModel):
    """Replicas per role (roles absent from the topology are unset)."""

    prefill: RoleStatus | None = Field(default=None, description="Prefill role.")
    decode: RoleStatus | None = Field(default=None, description="Decode role.")
    engine: RoleStatus | None = Field(default=None, description="Colocated engine role.")
    mempool: RoleStatus | None = Field(default=None, description="Memory pool role.")
    router: RoleStatus | None = Field(default=None, description="Router role.")


class ClassStatus(KubeModel):
    """Measured service of one SLO class over the planner's window."""

    name: str = Field(description="SLOClass name.")
    requests: int = Field(default=0, ge=0, description="Requests finished in the window.")
    attainment: float = Field(
        default=0.0, ge=0, le=1, description="Fraction meeting both TTFT and TPOT targets."
    )
    ttft_ms: float = Field(default=0.0, ge=0, description="TTFT at the class's percentile (ms).")
    tpot_ms: float = Field(default=0.0, ge=0, description="TPOT at the class's percentile (ms).")
    goodput_rps: float = Field(default=0.0, ge=0, description="Requests per second meeting both targets.")
    cost_per_million_tokens_usd: float = Field(
        default=0.0, ge=0, description="GPU cost per 1e6 output tokens."
    )


class WorkloadAdapters(KubeModel):
    """The LoRA variants one serving workload applies on its weights."""

    workload: str = Field(description="Deployment name.")
    variant: str = Field(description="The variant whose weights its pods load (its kvfleet.io/variant label).")
    adapters: list[str] = Field(default_factory=list, description="LoRA ModelVariants its pods also serve.")


class KVSharingStatus(KubeModel):
    """Whether one variant's declared cross-variant KV reuse (ModelVariant kvSharing) is in effect here."""

    variant: str = Field(description="The variant reusing KV.")
    from_variant: str = Field(description="The sibling whose cached KV it reuses.")
    in_effect: bool = Field(description="True when the engines apply it.")
    recompute_layers: list[int] | None = Field(default=None, description="Layers recomputed on reuse.")
    source: str | None = Field(default=None, description="manual, or the profile ConfigMap/key the layers came from.")
    ppl_increase: float | None = Field(
        default=None, description="The profile's measured relative perplexity rise for this plan.")
    reason: str | None = Field(default=None, description="Why it is not in effect.")


class InferenceFleetStatus(KubeModel):
    """What the operator observed about the fleet."""

    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Available, Progressing and Degraded, with observedGeneration."
    )
    roles: RolesStatus = Field(
        default_factory=RolesStatus, description="Desired and ready replicas per role."
    )
    router_endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI API.")
    adapters: list[WorkloadAdapters] = Field(
        default_factory=list, description="Which LoRA variants each serving workload serves on its base's pods."
    )
    kv_sharing: list[KVSharingStatus] = Field(
        default_factory=list, description="Cross-variant KV reuse (DroidSpeak) declared by the fleet's variants."
    )
    kv_pressure: float | None = Field(
        default=None, ge=0, le=1, description="Mean KV cache usage of decode pods."
    )
    attainment: float | None = Field(
        default=None, ge=0, le=1, description="Lowest attainment over the classes."
    )
    slo_classes: list[ClassStatus] = Field(
        default_factory=list, description="Per-class service and tokenomics."
    )
    tokens_per_second_per_gpu: float | None = Field(
        default=None, ge=0, description="Output tokens/s per GPU."
    )
    pool_hit_rate: float | None = Field(
        default=None, ge=0, le=1, description="KV memory pool: blocks found / blocks asked for over the window."
    )
    pool_bytes: int | None = Field(default=None, ge=0, description="KV memory pool: bytes held, all replicas.")


class InferenceFleet(Resource):
    """The whole InferenceFleet object."""

    kind: Literal["InferenceFleet"] = "InferenceFleet"
    spec: InferenceFleetSpec = Field(description="Desired state.")
    status: InferenceFleetStatus | None = Field(
        default=None, description="Observed state, written by the operator."
    )

    __rules__ = (NAME_RULE,)
