"""A read cache of the objects the operator watches anyway (an informer, fed by kopf's watch events).

kopf already streams every child Deployment/StatefulSet/Service/ConfigMap and every
ModelVariant/CachePolicy/SLOClass to the handlers in `main.py`; keeping the latest
body of each lets a reconcile skip re-listing them from the API server. The cache
is only ever a shortcut: the fleet itself is always read fresh, a reference the
cache does not hold is fetched from the API (so a missing reference is a real
404), the first reconcile of each fleet after a start lists its children from the
API, and anything stale is corrected by the next event (server-side apply is
idempotent and deleting an already deleted child is a no-op).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any

from .builders.names import LABEL_FLEET

CacheKey = tuple[str, str, str]  # (kind, namespace, name)


class ObjectCache:
    """Latest bodies by (kind, namespace, name), plus an index of children by (namespace, fleet)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[CacheKey, dict[str, Any]] = {}
        self._by_fleet: dict[tuple[str, str], set[CacheKey]] = {}

    def put(self, kind: str, body: Mapping[str, Any]) -> None:
        """Store a copy of the latest body seen for an object."""
        obj = copy.deepcopy(dict(body))
        obj["kind"] = kind
        meta = obj.get("metadata") or {}
        key = (kind, meta.get("namespace") or "", meta.get("name") or "")
        fleet = (meta.get("labels") or {}).get(LABEL_FLEET)
        with self._lock:
            old = self._objects.get(key)
            old_fleet = ((old or {}).get("metadata", {}).get("labels") or {}).get(LABEL_FLEET)
            if old_fleet and old_fleet != fleet:
                self._by_fleet.get((key[1], old_fleet), set()).discard(key)
            self._objects[key] = obj
            if fleet:
                self._by_fleet.setdefault((key[1], fleet), set()).add(key)

    def remove(self, kind: str, namespace: str, name: str) -> None:
        """Forget an object (it was deleted)."""
        key = (kind, namespace, name)
        with self._lock:
            obj = self._objects.pop(key, None)
            fleet = ((obj or {}).get("metadata", {}).get("labels") or {}).get(LABEL_FLEET)
            if fleet:
                self._by_fleet.get((namespace, fleet), set()).discard(key)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The latest body seen, or None."""
        with self._lock:
            return self._objects.get((kind, namespace, name))

    def children(self, namespace: str, fleet: str) -> list[dict[str, Any]]:
        """Every cached object labelled with this fleet."""
        with self._lock:
            return [self._objects[k] for k in sorted(self._by_fleet.get((namespace, fleet), ())) if k in self._objects]

    def __len__(self) -> int:
        return len(self._objects)
