"""The only module that writes to Kubernetes.

Children and status are written with server-side apply under one field manager
(`kvfleet-operator`) and `force=true`: whatever the operator declares, it owns,
so a hand edit of a declared field (or a `kubectl scale`) is taken back on the
next reconcile, while fields nobody declared are left alone. Deletions of
children that are no longer desired, and Events, are the other two writes.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from .builders.names import FIELD_MANAGER
from .kube import ApiError, Kube, path

APPLY = "application/apply-patch+yaml"
SSA_QUERY = {"fieldManager": FIELD_MANAGER, "force": "true"}


def apply(kube: Kube, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Server-side apply one object; returns the object as stored."""
    meta = obj["metadata"]
    return kube.request("PATCH", path(obj["kind"], meta.get("namespace"), meta["name"]), body=dict(obj),  # type: ignore[no-any-return]
                        query=SSA_QUERY, content_type=APPLY)


def apply_status(kube: Kube, kind: str, api_version: str, namespace: str, name: str,
                 status: Mapping[str, Any]) -> dict[str, Any] | None:
    """Server-side apply the fields of `status` we own on a custom resource's status subresource.

    Returns None when the object no longer exists (deleted meanwhile).
    """
    body = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "status": dict(status)}
    try:
        return kube.request("PATCH", path(kind, namespace, name, "status"), body=body,  # type: ignore[no-any-return]
                            query=SSA_QUERY, content_type=APPLY)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def delete(kube: Kube, obj: Mapping[str, Any]) -> bool:
    """Delete a child (guarded by its uid, dependents in the background); False if already gone."""
    meta = obj["metadata"]
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background",
            "preconditions": {"uid": meta["uid"]}}
    try:
        kube.request("DELETE", path(obj["kind"], meta["namespace"], meta["name"]), body=body)
        return True
    except ApiError as exc:
        if exc.status in (404, 409):
            return False
        raise


def event(kube: Kube, involved: Mapping[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
    """Record a core/v1 Event on an object (what `kubectl describe` and `kubectl events` show)."""
    meta = involved["metadata"]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": FIELD_MANAGER,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    kube.request("POST", path("Event", meta["namespace"]), body=body)
