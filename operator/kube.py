"""A small synchronous Kubernetes REST client over the `kubernetes` package's transport and auth.

Reads live here (`get`, `list`); every write goes through `kvfleet.operator.apply`,
which calls `request`. Paths are computed from apiVersion/kind for the few kinds
the operator touches, so no discovery round-trips are needed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kvfleet.operator.api import GROUP, VERSION

KVFLEET = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class KindInfo:
    """Where a kind lives in the REST API."""

    api_version: str
    plural: str
    namespaced: bool = True


KINDS: dict[str, KindInfo] = {
    "ConfigMap": KindInfo("v1", "configmaps"),
    "Service": KindInfo("v1", "services"),
    "Event": KindInfo("v1", "events"),
    "Deployment": KindInfo("apps/v1", "deployments"),
    "StatefulSet": KindInfo("apps/v1", "statefulsets"),
    "ServiceAccount": KindInfo("v1", "serviceaccounts"),
    "Role": KindInfo("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": KindInfo("rbac.authorization.k8s.io/v1", "rolebindings"),
    "InferenceFleet": KindInfo(KVFLEET, "inferencefleets"),
    "ModelVariant": KindInfo(KVFLEET, "modelvariants"),
    "CachePolicy": KindInfo(KVFLEET, "cachepolicies"),
    "SLOClass": KindInfo(KVFLEET, "sloclasses"),
}
PARTIAL_METADATA = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
# The kinds a fleet owns, listed by label to find children that are no longer desired.
CHILD_KINDS = ("ConfigMap", "Deployment", "StatefulSet", "Service", "ServiceAccount", "Role", "RoleBinding")
# Children whose content the reconciler never reads back (it re-applies on a changed hash): metadata lists suffice.
METADATA_ONLY_KINDS = ("ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding")


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, body: str, method: str, path: str):
        self.status, self.body = status, body
        try:
            self.reason = json.loads(body).get("message", body)
        except ValueError:
            self.reason = body
        super().__init__(f"{method} {path}: HTTP {status}: {self.reason}")


def path(kind: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
    """The REST path of a kind (collection when `name` is None)."""
    info = KINDS[kind]
    base = f"/api/{info.api_version}" if "/" not in info.api_version else f"/apis/{info.api_version}"
    if info.namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{info.plural}"
    if name:
        base += f"/{name}"
    if subresource:
        base += f"/{subresource}"
    return base


class Kube:
    """Thread-safe JSON requests against the API server (kubeconfig or in-cluster credentials)."""

    def __init__(self, configuration: k8s.Configuration | None = None, pool_size: int = 32):
        if configuration is None:
            configuration = k8s.Configuration()
            try:
                k8s_config.load_incluster_config(client_configuration=configuration)
            except k8s_config.ConfigException:
                k8s_config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        self._api = k8s.ApiClient(configuration)
        self._lock = threading.Lock()

    def request(self, method: str, url: str, body: Any = None, query: Mapping[str, str] | None = None,
                content_type: str = "application/json", accept: str = "application/json") -> Any:
        """One request; returns the decoded JSON answer or raises ApiError."""
        full = url + ("?" + urlencode(query) if query else "")
        params = self._api.param_serialize(
            method=method, resource_path=full,
            header_params={"Content-Type": content_type, "Accept": accept},
            body=body, auth_settings=["BearerToken"],
        )
        resp = self._api.call_api(*params)
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, data.decode(errors="replace"), method, url)
        return json.loads(data) if data else None

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(kind, namespace, name))  # type: ignore[no-any-return]
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None, selector: str | None = None,
             metadata_only: bool = False) -> list[dict[str, Any]]:
        """Items of a kind in a namespace (all namespaces when None), optionally by label selector.

        `metadata_only` asks the server for PartialObjectMetadata (no spec/data/status): much
        smaller answers where only names, uids, labels and owners are needed.
        """
        query = {"labelSelector": selector} if selector else None
        accept = PARTIAL_METADATA if metadata_only else "application/json"
        items = self.request("GET", path(kind, namespace), query=query, accept=accept).get("items") or []
        for item in items:  # list items carry no apiVersion/kind (metadata-only ones a generic one)
            item["apiVersion"] = KINDS[kind].api_version
            item["kind"] = kind
        return items  # type: ignore[no-any-return]

    def close(self) -> None:
        """Release the connection pool."""
        self._api.close()
