"""Observe -> plan for one fleet: the receiver's window and the observed workloads become the planner's
typed `Observation`; its `Plan` (replicas, conditions, events) comes back to the reconciler, which acts.

The planner's memory (`PlannerState`) and its last replicas live here, per fleet, in the operator's
memory. After an operator restart there is none: the replicas the workloads have now are the starting
point (reconcile from current state), and the planner's stabilisation windows start afresh, so a
restart never scales anything by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from .builders import FleetInputs
from .planner import (
    Bounds,
    ClassWindow,
    Observation,
    Plan,
    PlannerState,
    RoleObservation,
    bounds_from_fleet,
    plan,
)
from .status import WorkloadState
from .telemetry.window import FleetWindow

PLANNED_ROLES = ("prefill", "decode", "engine", "mempool")


def observation(window: FleetWindow, inputs: FleetInputs, workloads: Iterable[WorkloadState], now: float,
                window_s: float) -> Observation:
    """The planner's view of a fleet: its workloads' replicas and what the window measured."""
    gauges = {(r.role, r.variant): r for r in window.roles}
    queued = sum(r.router_queued or 0.0 for r in window.roles if r.role == "router")
    roles = []
    for w in workloads:
        if w.role not in PLANNED_ROLES:
            continue
        g = gauges.get((w.role, w.variant))
        queue = g.queue_depth if g is not None else None
        if w.role == "decode" and queued and w.ready:  # requests waiting in the router for KV room
            queue = (queue or 0.0) + queued / w.ready
        if w.role == "mempool":
            g = next((r for r in window.roles if r.role == "mempool"), None)  # the fleet's pool (no variant)
        roles.append(RoleObservation(w.role, w.variant if w.role != "mempool" else "",  # type: ignore[arg-type]
                                     w.desired, w.ready, kv_pressure=g.kv_pressure if g else None,
                                     queue_depth=queue, pool_hit_rate=g.pool_hit_rate if g else None,
                                     pool_churn=g.pool_churn if g else None))
    specs = {c.metadata.name: c.spec for c in inputs.slo_classes}
    classes = []
    for c in window.classes:
        spec = specs.get(c.name)
        if spec is None or not c.requests:
            continue
        classes.append(ClassWindow(c.name, c.requests, c.ttft_attained / c.requests, c.tpot_attained / c.requests,
                                   c.attained / c.requests, spec.attainment_target, not spec.sheddable,
                                   c.ttft_p90_ms, c.tpot_p90_ms, float(spec.ttft_ms), float(spec.tpot_ms)))
    return Observation(now, window.data_age_s, window_s, roles, classes)


def role_bounds(inputs: FleetInputs, roles: Sequence[RoleObservation]) -> dict[str, Bounds]:
    """Bounds keyed like the plan's replicas ("<variant>/<role>", or "<role>" for the mempool)."""
    per_role = bounds_from_fleet(inputs.fleet.spec)
    return {o.key: per_role[o.role] for o in roles if o.role in per_role}


@dataclass
class Autoscaler:
    """The planner's memory for every fleet this operator reconciles."""

    states: dict[tuple[str, str], PlannerState] = field(default_factory=dict)
    # what the planner last decided: its own record of the replicas, so a manual `kubectl scale` of a
    # workload is not mistaken for the current state (the one writer of replicas is the planner)
    planned: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)

    def step(self, inputs: FleetInputs, window: FleetWindow, workloads: list[WorkloadState], now: float,
             window_s: float) -> Plan:
        key = (inputs.namespace, inputs.name)
        obs = observation(window, inputs, workloads, now, window_s)
        mine = self.planned.get(key, {})
        obs = replace(obs, roles=[replace(o, replicas=mine.get(o.key, o.replicas)) for o in obs.roles])
        p = plan(inputs.fleet.spec.autoscaling, role_bounds(inputs, obs.roles), obs,
                 self.states.get(key, PlannerState()))
        self.states[key] = p.state
        self.planned[key] = {**mine, **p.replicas}
        return p

    def forget(self, namespace: str, name: str) -> None:
        self.states.pop((namespace, name), None)
        self.planned.pop((namespace, name), None)
