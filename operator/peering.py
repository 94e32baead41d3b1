"""Peering gate: with several replicas, only the one kopf lets run may reconcile.

kopf pauses its own handlers on a replica that loses peering, but the Controller's
queue, retries and resync loop are ours; the gate stops them too. It reads the
ClusterKopfPeering object kopf maintains and applies kopf's own rule: a replica
runs only while no live peer has a higher priority or the same one.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping
from typing import Any

from .kube import ApiError, Kube

PEERING_PATH = "/apis/kopf.dev/v1/clusterkopfpeerings/{name}"


def should_run(peers: Mapping[str, Any], identity: str, priority: int, now: dt.datetime) -> bool:
    """kopf's rule (engines/peering.py): pause while a live other peer has priority >= ours."""
    for peer, info in peers.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            seen = dt.datetime.fromisoformat(str(info.get("lastseen")))
        except ValueError:
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=dt.UTC)
        if seen + dt.timedelta(seconds=int(info.get("lifetime", 60))) <= now:
            continue  # dead peer
        if int(info.get("priority", 0)) >= priority:
            return False
    return True


class PeeringGate:
    """`active()` answers from the peering object, re-read at most every `ttl` seconds."""

    def __init__(self, kube: Kube, name: str, identity: str, priority: int, ttl: float = 2.0):
        self.kube, self.name, self.identity, self.priority, self.ttl = kube, name, identity, priority, ttl
        self._lock = threading.Lock()
        self._checked = 0.0
        self._active = True

    def active(self) -> bool:
        """Whether this replica may reconcile now (True when there is no peering object)."""
        with self._lock:
            if time.monotonic() - self._checked < self.ttl:
                return self._active
            try:
                body = self.kube.request("GET", PEERING_PATH.format(name=self.name))
                self._active = should_run(body.get("status") or {}, self.identity, self.priority,
                                          dt.datetime.now(dt.UTC))
            except ApiError as exc:
                if exc.status == 404:
                    self._active = True  # no peering object: kopf runs standalone too
            self._checked = time.monotonic()
            return self._active
