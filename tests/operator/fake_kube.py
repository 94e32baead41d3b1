"""An in-memory stand-in for `kvfleet.operator.kube.Kube`, enough for the reconciler's one write path.

It answers the REST calls the operator makes (GET object, GET list by label selector, server-side apply
PATCH of objects and of status, DELETE, POST of Events) on a dict of objects, assigning uid,
resourceVersion and generation as the API server does. For unit tests of the reconcile logic only;
the real API server proves the whole (tests/operator/*_k8s.py).
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

from kvfleet.operator.kube import KINDS, ApiError

_PATH = re.compile(r"^/apis?/(?P<gv>[^/]+(?:/v[^/]+)?)(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)"
                   r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?$")
_PLURAL = {info.plural: kind for kind, info in KINDS.items()}


class FakeKube:
    """Objects by (kind, namespace, name); `events` keeps what was posted."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._rv = itertools.count(1)
        self._uid = itertools.count(1)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object as a user would (kubectl apply)."""
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{next(self._uid)}")
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[(obj["kind"], meta.get("namespace", ""), meta["name"])] = obj
        return obj

    def request(self, method: str, url: str, body: Any = None, query: Any = None, **_: Any) -> Any:
        m = _PATH.match(url.split("?")[0])
        if m is None:
            raise ApiError(404, f"no route {url}", method, url)
        kind = _PLURAL.get(m["plural"])
        if kind == "Event" and method == "POST":
            self.events.append(copy.deepcopy(body))
            return body
        ns, name = m["ns"] or "", m["name"]
        key = (kind or "", ns, name or "")
        if method == "GET" and name:
            if key not in self.objects:
                raise ApiError(404, "not found", method, url)
            return copy.deepcopy(self.objects[key])
        if method == "GET":
            selector = dict(p.split("=", 1) for p in (query or {}).get("labelSelector", "").split(",") if p)
            items = [copy.deepcopy(o) for (k, n, _), o in self.objects.items() if k == kind and n == ns and
                     all((o["metadata"].get("labels") or {}).get(a) == b for a, b in selector.items())]
            return {"items": items}
        if method == "PATCH" and m["sub"]:
            if key not in self.objects:
                raise ApiError(404, "not found", method, url)
            self.objects[key]["status"] = copy.deepcopy(body.get("status"))
            return copy.deepcopy(self.objects[key])
        if method == "PATCH":
            old = self.objects.get(key)
            new = copy.deepcopy(body)
            meta = new["metadata"]
            meta["uid"] = old["metadata"]["uid"] if old else f"uid-{next(self._uid)}"
            changed = old is None or old.get("spec") != new.get("spec")
            meta["generation"] = (old["metadata"].get("generation", 1) + changed) if old else 1
            meta["resourceVersion"] = str(next(self._rv))
            if old and "status" in old:
                new["status"] = old["status"]
            self.objects[key] = new
            return copy.deepcopy(new)
        if method == "DELETE":
            return self.objects.pop(key, None)
        raise ApiError(405, f"{method} not faked", method, url)

    # the two helpers of Kube the reconciler calls besides request()

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(obj) if obj else None

    def list(self, kind: str, namespace: str | None, selector: str | None = None,
             metadata_only: bool = False) -> list[dict[str, Any]]:
        sel = dict(p.split("=", 1) for p in (selector or "").split(",") if p and "=" in p)
        return [copy.deepcopy(o) for (k, n, _), o in self.objects.items() if k == kind and n == (namespace or "")
                and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in sel.items())]

    def close(self) -> None:
        pass
