"""Which prefill, decode and memory-pool pods exist: from the Kubernetes API (watch pods by label) or a
static list. Pool pods serve every variant of the fleet: their endpoints have the variant "".

The router asks `endpoints(role, variant)` at every pick, so a pod that leaves discovery gets no new
work from the next pick on. `StaticDiscovery` is the in-process fake (and the local-run mode);
`KubernetesDiscovery` watches the fleet's pods in its namespace (get/list/watch pods is all the
router's ServiceAccount may do) and keeps those that are Ready and have an IP.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """One serving pod: its name, gRPC address, role and variant."""

    name: str
    address: str  # host:port
    role: str
    variant: str


class PodDiscovery(ABC):
    """The current set of serving pods. Implementations are safe to read from the event loop."""

    @abstractmethod
    def endpoints(self, role: str, variant: str) -> list[Endpoint]: ...

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin watching (idempotent)."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop watching."""


class StaticDiscovery(PodDiscovery):
    """A fixed (or test-mutated) list of endpoints."""

    def __init__(self, endpoints: list[Endpoint] | None = None) -> None:
        self._eps: dict[str, Endpoint] = {e.name: e for e in endpoints or []}

    def endpoints(self, role: str, variant: str) -> list[Endpoint]:
        return [e for e in self._eps.values() if e.role == role and e.variant == variant]

    def add(self, ep: Endpoint) -> None:
        self._eps[ep.name] = ep

    def remove(self, name: str) -> None:
        self._eps.pop(name, None)

    @classmethod
    def parse(cls, specs: list[str]) -> StaticDiscovery:
        """`role=variant@host:port` strings (the router's `--endpoint` flag)."""
        eps = []
        for i, spec in enumerate(specs):
            try:
                role, rest = spec.split("=", 1)
                variant, address = rest.split("@", 1)
            except ValueError as e:
                raise ValueError(f"endpoint {spec!r}: expected ROLE=VARIANT@HOST:PORT") from e
            eps.append(Endpoint(f"{role}-{i}", address, role, variant))
        return cls(eps)


def _ready(pod: Any) -> bool:
    st = pod.status
    if st is None or not st.pod_ip or st.phase != "Running" or pod.metadata.deletion_timestamp:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in st.conditions or [])


class KubernetesDiscovery(PodDiscovery):
    """Watches pods labelled `kvfleet.io/fleet=<fleet>` in one namespace (a thread; list, then watch)."""

    def __init__(self, namespace: str, fleet: str, grpc_port: int, api: Any = None,
                 pool_port: int | None = None) -> None:
        self.namespace, self.fleet = namespace, fleet
        self.ports = {"prefill": grpc_port, "decode": grpc_port}
        if pool_port is not None:
            self.ports["mempool"] = pool_port
        self._api = api
        self._pods: dict[str, Endpoint] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()  # the first list has been read

    def endpoints(self, role: str, variant: str) -> list[Endpoint]:
        with self._lock:
            return [e for e in self._pods.values() if e.role == role and e.variant == variant]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvfleet-discovery", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()  # local runs and the pod runner: KUBECONFIG with the pod's SA token
            self._api = client.CoreV1Api()
        return self._api

    def _apply(self, pod: Any, deleted: bool) -> None:
        labels = pod.metadata.labels or {}
        name = pod.metadata.name
        with self._lock:
            role = labels.get("kvfleet.io/role", "")
            if deleted or not _ready(pod) or role not in self.ports:
                if self._pods.pop(name, None) is not None:
                    log.info("discovery: %s left", name)
                return
            variant = "" if role == "mempool" else labels.get("kvfleet.io/variant", "")
            ep = Endpoint(name, f"{pod.status.pod_ip}:{self.ports[role]}", role, variant)
            if self._pods.get(name) != ep:
                log.info("discovery: %s is %s of %s at %s", name, ep.role, ep.variant, ep.address)
            self._pods[name] = ep

    def _run(self) -> None:
        from kubernetes import watch

        selector = f"kvfleet.io/fleet={self.fleet}"
        while not self._stop.is_set():
            try:
                api = self._client()
                listed = api.list_namespaced_pod(self.namespace, label_selector=selector)
                with self._lock:
                    self._pods.clear()
                for pod in listed.items:
                    self._apply(pod, False)
                self.synced.set()
                w = watch.Watch()
                for ev in w.stream(api.list_namespaced_pod, self.namespace, label_selector=selector,
                                   resource_version=listed.metadata.resource_version, timeout_seconds=60):
                    self._apply(ev["object"], ev["type"] == "DELETED")
                    if self._stop.is_set():
                        w.stop()
                        return
            except Exception as e:  # noqa: BLE001 - 410 Gone, API restarts: re-list after a pause
                log.warning("discovery: watch of pods failed (%s); re-listing", e)
                time.sleep(1.0)
