"""Desired objects of one fleet: ConfigMaps, Deployments, the pool StatefulSet, Services, router RBAC (pure).

    desired_objects(inputs) -> [ConfigMap, Deployment, ..., Service]

Disaggregated: `<fleet>-<variant>-prefill` and `-decode` Deployments per serving group;
colocated: one `<fleet>-<variant>-engine` Deployment per serving group (`serving.py`: a variant with
its own weights, plus the LoRA variants that ride on it; annotation `kvfleet.io/adapters` lists them). The router
(Deployment + Service, the fleet's OpenAI endpoint) and, when the cache policy
enables it, the memory pool (StatefulSet + headless Service) are shared by the
fleet. Output is deterministic: the same inputs give equal objects.
"""

from __future__ import annotations

from typing import Any

from .config import (
    CACHE_POLICY_JSON,
    GRPC_PORT,
    HTTP_PORT,
    MEMPOOL_JSON,
    POOL_PORT,
    ROUTER_CONTAINER_PORT,
    ROUTER_JSON,
    VARIANT_JSON,
    config_map,
    fleet_config_data,
    role_config_key,
    variant_config_data,
)
from .inputs import FleetInputs, desired_replicas
from .names import ANNOTATION_ADAPTERS, child_name, config_hash, labels, owner_reference, selector_labels
from .pods import pod_template
from .serving import ServingGroup, serving_groups


def _meta(inputs: FleetInputs, name: str, role: str, variant: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": inputs.namespace,
        "labels": labels(inputs.name, role, variant, inputs.settings.version),
        "ownerReferences": [owner_reference(dict(inputs.fleet_body))],
    }


def _deployment(inputs: FleetInputs, name: str, role: str, replicas: int, template: dict[str, Any],
                selector: dict[str, str], variant: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(inputs, name, role, variant),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector},
            # Never drop below the serving count while rolling: new pods come up before old ones go.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": template,
        },
    }


def engine_deployment(inputs: FleetInputs, group: ServingGroup, role: str,
                      variant_data: dict[str, str]) -> dict[str, Any]:
    """A prefill, decode or (colocated) engine Deployment for one serving group."""
    spec = inputs.engine_roles()[role]
    variant = group.lead
    vname = group.name
    selector = selector_labels(inputs.name, role, vname)
    mounted = {k: variant_data[k] for k in (role_config_key(role), CACHE_POLICY_JSON, VARIANT_JSON)}
    template = pod_template(
        inputs, role,
        selector=selector,
        config_map=child_name(inputs.name, vname, "config"),
        config_hash=config_hash(mounted),
        ports=[{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT}],
        spec_resources=spec.resources,
        spec_placement=spec.placement,
        variant=variant,
        grace_seconds=inputs.fleet.spec.autoscaling.drain_seconds + 5,
        role_annotations=spec.pod_annotations,
        adapters=group.adapters,
    )
    replicas = desired_replicas(spec, inputs.planned.get(f"{vname}/{role}"))
    dep = _deployment(inputs, child_name(inputs.name, vname, role), role, replicas, template, selector, vname)
    if group.adapters:  # read back into the fleet's status (which adapters each workload serves)
        dep["metadata"]["annotations"] = {ANNOTATION_ADAPTERS: ",".join(a.metadata.name for a in group.adapters)}
    return dep


def router_objects(inputs: FleetInputs, fleet_data: dict[str, str]) -> list[dict[str, Any]]:
    """The router Deployment and its Service (the fleet's OpenAI-compatible endpoint)."""
    spec = inputs.fleet.spec.router
    name = child_name(inputs.name, "router")
    selector = selector_labels(inputs.name, "router")
    template = pod_template(
        inputs, "router",
        selector=selector,
        config_map=child_name(inputs.name, "config"),
        config_hash=config_hash({ROUTER_JSON: fleet_data[ROUTER_JSON]}),
        ports=[{"name": "http", "containerPort": ROUTER_CONTAINER_PORT}],
        spec_resources=spec.resources,
        spec_placement=spec.placement,
        config_file=ROUTER_JSON,
    )
    # The router discovers its fleet's pods from the API under its own ServiceAccount (rbac_objects).
    template["spec"]["serviceAccountName"] = name
    template["spec"]["automountServiceAccountToken"] = True
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(inputs, name, "router"),
        "spec": {
            "type": spec.service_type,
            "selector": selector,
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [*router_rbac(inputs, name), _deployment(inputs, name, "router", spec.replicas, template, selector),
            service]


ROUTER_RULES = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def router_rbac(inputs: FleetInputs, name: str) -> list[dict[str, Any]]:
    """The router's ServiceAccount, and a Role in the fleet's namespace that only reads pods (discovery)."""
    meta = _meta(inputs, name, "router")
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False},
        {"apiVersion": rbac, "kind": "Role", "metadata": meta, "rules": ROUTER_RULES},
        {"apiVersion": rbac, "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": inputs.namespace}]},
    ]


def mempool_objects(inputs: FleetInputs, fleet_data: dict[str, str]) -> list[dict[str, Any]]:
    """The KV memory pool: a StatefulSet (stable shard identities) and its headless Service."""
    spec = inputs.fleet.spec.mempool
    name = child_name(inputs.name, "mempool")
    selector = selector_labels(inputs.name, "mempool")
    template = pod_template(
        inputs, "mempool",
        selector=selector,
        config_map=child_name(inputs.name, "config"),
        config_hash=config_hash({MEMPOOL_JSON: fleet_data[MEMPOOL_JSON]}),
        ports=[{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": POOL_PORT}],
        spec_resources=spec.resources,
        spec_placement=spec.placement,
        config_file=MEMPOOL_JSON,
    )
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(inputs, name, "mempool"),
        "spec": {
            "replicas": spec.replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": template,
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(inputs, name, "mempool"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector,
            "ports": [{"name": "grpc", "port": POOL_PORT, "targetPort": "grpc", "protocol": "TCP"}],
        },
    }
    return [statefulset, service]


def desired_objects(inputs: FleetInputs) -> list[dict[str, Any]]:
    """Every object the fleet should own, in apply order (config before the pods that mount it)."""
    fleet_data = fleet_config_data(inputs)
    objects: list[dict[str, Any]] = [config_map(inputs, child_name(inputs.name, "config"), fleet_data)]
    workloads: list[dict[str, Any]] = []
    for group in serving_groups(inputs):
        vname = group.name
        vdata = variant_config_data(inputs, group)
        objects.append(config_map(inputs, child_name(inputs.name, vname, "config"), vdata, vname))
        for role in inputs.engine_roles():
            workloads.append(engine_deployment(inputs, group, role, vdata))
    if inputs.pool_enabled:
        workloads += mempool_objects(inputs, fleet_data)
    workloads += router_objects(inputs, fleet_data)
    return objects + workloads


def router_endpoint(inputs: FleetInputs) -> str:
    """The in-cluster URL of the fleet's OpenAI API."""
    svc = child_name(inputs.name, "router")
    return f"http://{svc}.{inputs.namespace}.svc:{inputs.fleet.spec.router.port}/v1"
