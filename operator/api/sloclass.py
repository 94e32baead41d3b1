"""SLOClass: a named latency promise that drives admission, scheduling, routing and scaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import NAME_RULE, KubeModel, ReferencedStatus, Resource, Rule


class KVPinning(KubeModel):
    """Keep this class's hottest prefixes resident in the KV cache and memory pool."""

    enabled: bool = Field(default=False, description="Pin prefix blocks of this class against LRU eviction.")
    max_pinned_bytes: int = Field(
        default=0,
        ge=0,
        le=2**40,
        description="Upper bound on pinned KV bytes per pod for this class (0 = no pinning; at most 1 TiB).",
    )

    __rules__ = (
        Rule(
            cel="!self.enabled || self.maxPinnedBytes > 0",
            message="maxPinnedBytes must be > 0 when pinning is enabled",
            check=lambda s: not s.enabled or s.max_pinned_bytes > 0,
            field_path=".maxPinnedBytes",
        ),
        Rule(
            cel="self.enabled || self.maxPinnedBytes == 0",
            message="maxPinnedBytes applies only when pinning is enabled",
            check=lambda s: s.enabled or s.max_pinned_bytes == 0,
            field_path=".maxPinnedBytes",
        ),
    )


class SLOClassSpec(KubeModel):
    """Latency targets and how much this class matters when capacity is short."""

    ttft_ms: int = Field(ge=1, le=600000, description="Time-to-first-token target in milliseconds.")
    tpot_ms: int = Field(
        ge=1,
        le=60000,
        description="Time-per-output-token target (mean over a request, after the first) in ms.",
    )
    percentile: float = Field(
        default=90.0,
        ge=50.0,
        le=99.99,
        description="Latency percentile the targets are reported at (e.g. 90 = p90).",
    )
    attainment_target: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Fraction of requests that must meet BOTH ttftMs and tpotMs (DistServe goodput); "
        "the autoscaler adds capacity while attainment is below it.",
    )
    priority: int = Field(
        default=100, ge=0, le=1000, description="Higher is more important: scheduled first, preempted last."
    )
    sheddable: bool = Field(
        default=False,
        description="Under overload the router may reject this class's requests (HTTP 429) early.",
    )
    max_queue_ms: int | None = Field(
        default=None,
        ge=1,
        le=600000,
        description="Sheddable only: reject a request still queued after this many ms.",
    )
    kv_pinning: KVPinning = Field(
        default_factory=KVPinning, description="Optional KV pinning for this class."
    )

    __rules__ = (
        Rule(
            cel="self.sheddable || !has(self.maxQueueMs)",
            message="maxQueueMs applies only to sheddable classes",
            check=lambda s: s.sheddable or s.max_queue_ms is None,
            field_path=".maxQueueMs",
        ),
        Rule(
            cel="!(self.sheddable && self.kvPinning.enabled)",
            message="a sheddable class cannot pin KV blocks",
            check=lambda s: not (s.sheddable and s.kv_pinning.enabled),
            field_path=".kvPinning",
        ),
    )


class SLOClass(Resource):
    """The whole SLOClass object."""

    kind: Literal["SLOClass"] = "SLOClass"
    spec: SLOClassSpec = Field(description="Desired state.")
    status: ReferencedStatus | None = Field(
        default=None, description="Observed state, written by the operator."
    )

    __rules__ = (NAME_RULE,)
