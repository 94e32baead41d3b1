"""Fleet status from what was observed (pure): conditions, per-role replicas, the endpoint.

Conditions follow metav1.Condition: each carries observedGeneration, and its
lastTransitionTime changes only when its status flips (not when re-reported).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .builders.names import ANNOTATION_ADAPTERS, LABEL_ROLE, LABEL_VARIANT

CONDITION_TYPES = ("Available", "Progressing", "Degraded")


@dataclass(frozen=True)
class WorkloadState:
    """One observed Deployment or StatefulSet, reduced to what status needs."""

    name: str
    role: str
    variant: str
    desired: int
    ready: int
    rolled_out: bool  # the controller saw the latest spec and every replica runs it and is ready
    adapters: tuple[str, ...] = ()  # LoRA variants its pods serve on its weights (builders/serving.py)


def workload_state(obj: Mapping[str, Any]) -> WorkloadState:
    """Reduce a Deployment/StatefulSet body to a WorkloadState."""
    meta, spec, st = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    labels = meta.get("labels") or {}
    desired = int(spec.get("replicas", 1))
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    seen = int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    rolled = seen and updated == desired and ready == desired and int(st.get("replicas") or 0) == desired
    if obj.get("kind") == "StatefulSet" and st.get("updateRevision"):
        rolled = rolled and st.get("currentRevision") == st.get("updateRevision")
    adapters = tuple(a for a in ((meta.get("annotations") or {}).get(ANNOTATION_ADAPTERS) or "").split(",") if a)
    return WorkloadState(meta.get("name", ""), labels.get(LABEL_ROLE, ""), labels.get(LABEL_VARIANT, ""),
                         desired, ready, rolled, adapters)


def condition(type_: str, status: bool, reason: str, message: str, generation: int | None,
              previous: Iterable[Mapping[str, Any]], now: str) -> dict[str, Any]:
    """A condition whose lastTransitionTime is carried over unless its status flipped."""
    value = "True" if status else "False"
    since = now
    for old in previous:
        if old.get("type") == type_ and old.get("status") == value and old.get("lastTransitionTime"):
            since = old["lastTransitionTime"]
    out: dict[str, Any] = {"type": type_, "status": value, "reason": reason, "message": message,
                           "lastTransitionTime": since}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def roles_status(workloads: Iterable[WorkloadState]) -> dict[str, dict[str, int]]:
    """Desired/ready replicas summed per role over the variants."""
    roles: dict[str, dict[str, int]] = {}
    for w in workloads:
        entry = roles.setdefault(w.role, {"desired": 0, "ready": 0})
        entry["desired"] += w.desired
        entry["ready"] += w.ready
    return dict(sorted(roles.items()))


def fleet_status(*, generation: int | None, previous: Iterable[Mapping[str, Any]],
                 problem: tuple[str, str] | None, workloads: list[WorkloadState],
                 endpoint: str | None, now: str) -> dict[str, Any]:
    """The status fields the reconciler owns (conditions, roles, routerEndpoint, observedGeneration).

    `problem` is (reason, message) when references are missing/invalid or applying
    failed: Degraded=True, and the workloads are the last applied ones, still serving.
    """
    previous = list(previous)
    down = sorted(w.name for w in workloads if w.desired > 0 and w.ready == 0)
    has_router = any(w.role == "router" for w in workloads)
    if not workloads:
        available = condition("Available", False, "NotApplied", "No workloads exist yet.", generation, previous, now)
    elif down or not has_router:
        msg = f"No ready replicas in: {', '.join(down)}." if down else "The router does not exist."
        available = condition("Available", False, "ReplicasUnavailable", msg, generation, previous, now)
    else:
        available = condition("Available", True, "MinimumReplicasAvailable",
                              "The router and every serving role have ready replicas.", generation, previous, now)
    rolling = sorted(w.name for w in workloads if not w.rolled_out)
    if rolling:
        progressing = condition("Progressing", True, "RollingOut", f"Rolling out: {', '.join(rolling)}.",
                                generation, previous, now)
    elif problem:
        progressing = condition("Progressing", False, problem[0], "Waiting for the problem in Degraded to be fixed.",
                                generation, previous, now)
    else:
        progressing = condition("Progressing", False, "RolloutComplete",
                                "Every workload runs the latest spec with all replicas ready.",
                                generation, previous, now)
    if problem:
        degraded = condition("Degraded", True, problem[0], problem[1], generation, previous, now)
    else:
        degraded = condition("Degraded", False, "AsExpected", "All references resolved and every child applied.",
                             generation, previous, now)
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [available, progressing, degraded],
        "roles": roles_status(workloads),
    }
    served = [{"workload": w.name, "variant": w.variant, "adapters": list(w.adapters)}
              for w in sorted(workloads, key=lambda w: w.name) if w.adapters]
    if served:
        out["adapters"] = served
    if endpoint:
        out["routerEndpoint"] = endpoint
    return out


def status_changed(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether any field the reconciler owns differs from the object's current status."""
    current = current or {}
    return any(current.get(k) != v for k, v in new.items())


def used_by_status(previous: Mapping[str, Any] | None, fleets: Iterable[str], generation: int | None,
                   valid: tuple[bool, str], now: str) -> dict[str, Any]:
    """Status of a ModelVariant/CachePolicy/SLOClass: which fleets use it and whether it parses."""
    prev_conditions = (previous or {}).get("conditions") or []
    ok, message = valid
    cond = condition("Available", ok, "Valid" if ok else "Invalid", message, generation, prev_conditions, now)
    return {"observedGeneration": generation, "conditions": [cond], "usedByFleets": sorted(set(fleets))}
