"""What the builders read: one fleet with its references resolved (pure data, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvfleet.dataplane.config import KVShareConfig
from kvfleet.operator.api import CachePolicySpec, InferenceFleet, ModelVariant, SLOClass
from kvfleet.operator.api.fleet import RoleSpec

DEFAULT_IMAGE = "ghcr.io/kvfleet/kvfleet-engine:0.1.0"  # the dataplane image (Dockerfile target `engine`)


@dataclass(frozen=True)
class OperatorSettings:
    """Operator-wide settings the builders need (from flags / the chart's values)."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    # The operator's own OTLP receiver Service (e.g. http://kvfleet-otlp.kvfleet-system.svc:4317).
    otlp_endpoint: str | None = None
    version: str = "0.1.0"
    # Node directories a ModelVariant's hostPath may lie at or below; empty: no hostPath is mounted.
    host_path_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetInputs:
    """An InferenceFleet plus everything it references, already fetched and validated.

    `fleet_body` is the raw object (for name, namespace, uid); `fleet` its parsed model.
    `planned` holds planner decisions keyed "<variant>/<role>" (or "<role>" for
    fleet-wide roles); they are clamped into each role's min..max, and a pinned
    `replicas` always wins.
    """

    fleet_body: Mapping[str, Any]
    fleet: InferenceFleet
    variants: tuple[ModelVariant, ...]
    cache_policy: CachePolicySpec
    slo_classes: tuple[SLOClass, ...]
    settings: OperatorSettings = field(default_factory=OperatorSettings)
    planned: Mapping[str, int] = field(default_factory=dict)
    # cross-variant KV reuse (operator/sharing.py): what the engines apply, and the status rows
    kv_sharing: tuple[KVShareConfig, ...] = ()
    kv_sharing_status: tuple[Mapping[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """The fleet's name."""
        return str(self.fleet_body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        """The fleet's namespace (every child lives there)."""
        return str(self.fleet_body["metadata"].get("namespace") or "default")

    @property
    def image(self) -> str:
        """The image of every role: the fleet's spec.image, else the operator's --image."""
        return self.fleet.spec.image or self.settings.image

    def engine_roles(self) -> dict[str, RoleSpec]:
        """The per-variant serving roles of the topology: prefill+decode, or engine."""
        topo = self.fleet.spec.topology
        if topo.mode == "colocated":
            assert topo.engine is not None
            return {"engine": topo.engine}
        assert topo.prefill is not None and topo.decode is not None
        return {"prefill": topo.prefill, "decode": topo.decode}

    @property
    def pool_enabled(self) -> bool:
        """Whether the cache policy runs the memory pool role."""
        return self.cache_policy.pool.enabled


def desired_replicas(spec: RoleSpec, planned: int | None) -> int:
    """Replicas for one workload: a pinned count wins; else the planner's value (or min) clamped to min..max."""
    if spec.replicas is not None:
        return spec.replicas
    want = spec.min_replicas if planned is None else planned
    return max(spec.min_replicas, min(spec.max_replicas, want))
