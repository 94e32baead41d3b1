"""Pure decisions about a fleet's existing children: what to delete, which scales to revert."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .builders.names import FIELD_MANAGER, LABEL_ROLE

Key = tuple[str, str]  # (kind, name)


def key(obj: Mapping[str, Any]) -> Key:
    """(kind, name): how desired and observed children are matched."""
    return (str(obj["kind"]), str(obj["metadata"]["name"]))


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether `obj` has a controller owner reference to the fleet with this uid."""
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences") or ())


def stale_children(desired: Iterable[Mapping[str, Any]], observed: Iterable[Mapping[str, Any]],
                   uid: str) -> list[Mapping[str, Any]]:
    """Observed children of this fleet (by owner uid) that are no longer desired, e.g. prefill/decode
    Deployments after a switch to colocated, or the pool after the policy disables it."""
    wanted = {key(o) for o in desired}
    return [o for o in observed if key(o) not in wanted and owned_by(o, uid)]


@dataclass(frozen=True)
class ManualScale:
    """A workload whose replicas someone else set; the forced apply takes them back."""

    kind: str
    name: str
    role: str
    observed: int
    desired: int
    manager: str


def replicas_manager(obj: Mapping[str, Any]) -> str | None:
    """The field manager owning spec.replicas (None when unknown)."""
    for entry in obj["metadata"].get("managedFields") or ():
        spec = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if "f:replicas" in spec:
            return str(entry.get("manager", ""))
    return None


def manual_scales(desired: Iterable[Mapping[str, Any]], observed: Iterable[Mapping[str, Any]]) -> list[ManualScale]:
    """Workloads whose spec.replicas differs from ours AND is owned by another field manager.

    A difference we caused ourselves (a new min, a planner decision) leaves us as
    the owner of spec.replicas, so it is not reported as a manual scale.
    """
    by_key = {key(o): o for o in observed}
    out = []
    for want in desired:
        if want["kind"] not in ("Deployment", "StatefulSet"):
            continue
        have = by_key.get(key(want))
        if have is None:
            continue
        observed_n = int((have.get("spec") or {}).get("replicas", 1))
        manager = replicas_manager(have)
        if observed_n != want["spec"]["replicas"] and manager not in (None, FIELD_MANAGER):
            out.append(ManualScale(want["kind"], want["metadata"]["name"],
                                   want["metadata"]["labels"].get(LABEL_ROLE, ""), observed_n,
                                   int(want["spec"]["replicas"]), manager))
    return out
