"""Pod templates: one container per role, hardened, probed, traced (pure)."""

from __future__ import annotations

import copy
from typing import Any

from kvfleet.dataplane.config import ConfigError
from kvfleet.operator.api import ModelVariant
from kvfleet.operator.api.common import Placement, Resources
from kvfleet.operator.api.shapes import is_qualified_name, is_reserved_annotation, under_prefix

from .config import CACHE_DIR, CONFIG_DIR, MODELS_DIR, role_config_key
from .inputs import FleetInputs
from .names import ANNOTATION_CONFIG_HASH, labels

GPU = "nvidia.com/gpu"
RUN_AS = 10001
USER_OTLP_ENV = "KVFLEET_OTLP_USER_ENDPOINT"


def resources(spec: Resources) -> dict[str, Any]:
    """core/v1 ResourceRequirements; a GPU given only as a request or only as a limit is set on both.

    Kubernetes does not overcommit extended resources: it rejects a GPU request
    without an equal limit, so the builder completes the pair.
    """
    requests = {k: v for k, v in spec.requests.items()}
    limits = {k: v for k, v in spec.limits.items()}
    if GPU in requests and GPU not in limits:
        limits[GPU] = requests[GPU]
    if GPU in limits and GPU not in requests:
        requests[GPU] = limits[GPU]
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def placement(spec: Placement, selector: dict[str, str]) -> dict[str, Any]:
    """nodeSelector, tolerations and (optionally) a soft zone spread for a pod spec."""
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [t.to_k8s() for t in spec.tolerations]
    if spec.spread_across_zones:
        out["topologySpreadConstraints"] = [{
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector},
        }]
    return out


CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _probe(port: str, **extra: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": port}, "timeoutSeconds": 2, **extra}


def probes() -> dict[str, Any]:
    """HTTP /health probes; the startup probe allows ten minutes for weights to load."""
    return {
        "startupProbe": _probe("http", periodSeconds=5, failureThreshold=120),
        "readinessProbe": _probe("http", periodSeconds=5, failureThreshold=3),
        "livenessProbe": _probe("http", periodSeconds=10, failureThreshold=6),
    }


def env(inputs: FleetInputs, role: str, variant: str | None) -> list[dict[str, Any]]:
    """Identity (downward API), and OTel export to the operator's receiver plus the user's collector."""
    telemetry = inputs.fleet.spec.telemetry
    # k8s.pod.name expands $(POD_NAME) (declared above it): the receiver tells pods apart by it
    attrs = (f"kvfleet.fleet={inputs.name},kvfleet.role={role},k8s.namespace.name={inputs.namespace},"
             "k8s.pod.name=$(POD_NAME)")
    if variant:
        attrs += f",kvfleet.variant={variant}"
    out: list[dict[str, Any]] = [
        {"name": "KVFLEET_FLEET", "value": inputs.name},
        {"name": "KVFLEET_ROLE", "value": role},
        {"name": "KVFLEET_VARIANT", "value": variant or ""},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HOME", "value": "/tmp"},
        # on SIGTERM a serving process stops admitting and lets in-flight requests finish this long
        {"name": "KVFLEET_DRAIN_SECONDS", "value": str(inputs.fleet.spec.autoscaling.drain_seconds)},
        {"name": "OTEL_SERVICE_NAME", "value": f"kvfleet-{role}"},
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": attrs},
        {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
        {"name": "OTEL_TRACES_SAMPLER_ARG", "value": repr(float(telemetry.sampling_ratio))},
    ]
    if inputs.settings.otlp_endpoint:
        out.append({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": inputs.settings.otlp_endpoint})
    if telemetry.otlp_endpoint:
        # The user's collector gets a copy of every span (kvfleet.dataplane.tracing exports to both).
        out.append({"name": USER_OTLP_ENV, "value": telemetry.otlp_endpoint})
    return out


def _weights_volumes(
    variant: ModelVariant, host_path_prefixes: tuple[str, ...], adapters: tuple[ModelVariant, ...] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The weights a group's pods mount: the lead variant's base (and fine-tune), each adapter's directory."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    sources = [("weights-base", variant, "base", variant.spec.base)]
    if variant.spec.fine_tune is not None:
        sources.append(("weights-finetune", variant, "finetune", variant.spec.fine_tune.weights))
    for i, a in enumerate(x for x in adapters if x is not variant):
        assert a.spec.fine_tune is not None
        sources.append((f"adapter-{i}", a, "finetune", a.spec.fine_tune.weights))
    for vol, owner, which, src in sources:
        mount = {"name": vol, "mountPath": f"{MODELS_DIR}/{owner.metadata.name}/{which}", "readOnly": True}
        if src.host_path:
            # resolve() refuses these with a condition; this is the last line of defence.
            if not under_prefix(src.host_path, host_path_prefixes):
                raise ConfigError(f"hostPath {src.host_path!r} is not below an allowed prefix")
            volumes.append({"name": vol, "hostPath": {"path": src.host_path, "type": "Directory"}})
        elif src.pvc:
            volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": src.pvc.claim_name,
                                                                  "readOnly": True}})
            if src.pvc.sub_path:
                mount["subPath"] = src.pvc.sub_path
        else:
            continue  # builtin: materialised by the image under CACHE_DIR
        mounts.append(mount)
    return volumes, mounts


def pod_template(
    inputs: FleetInputs,
    role: str,
    *,
    selector: dict[str, str],
    config_map: str,
    config_hash: str,
    ports: list[dict[str, Any]],
    spec_resources: Resources,
    spec_placement: Placement,
    variant: ModelVariant | None = None,
    config_file: str | None = None,
    grace_seconds: int = 30,
    role_annotations: dict[str, str] | None = None,
    adapters: tuple[ModelVariant, ...] = (),
) -> dict[str, Any]:
    """The pod template of one role: `python -m kvfleet.dataplane.roles.<role> --config ...`.

    Pod annotations: the fleet's podAnnotations, then the role's own, then the config hash (never overridden).
    """
    vname = variant.metadata.name if variant else None
    config_file = config_file or "engine.json"
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    if variant is not None:
        # The role's own EngineConfig key appears as /etc/kvfleet/engine.json; the rest keep their names.
        mounts.append({"name": "config", "mountPath": f"{CONFIG_DIR}/engine.json",
                       "subPath": role_config_key(role), "readOnly": True})
        for key in ("cache-policy.json", "variant.json"):
            mounts.append({"name": "config", "mountPath": f"{CONFIG_DIR}/{key}", "subPath": key,
                           "readOnly": True})
        wv, wm = _weights_volumes(variant, inputs.settings.host_path_prefixes, adapters)
        volumes += wv
        mounts += wm
    else:
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
    container = {
        "name": role,
        "image": inputs.image,
        "imagePullPolicy": inputs.settings.image_pull_policy,
        "command": ["python", "-m", f"kvfleet.dataplane.roles.{role}", "--config", f"{CONFIG_DIR}/{config_file}"],
        "ports": ports,
        "env": env(inputs, role, vname),
        "resources": resources(spec_resources),
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        **probes(),
    }
    annotations = {**inputs.fleet.spec.pod_annotations, **(role_annotations or {})}
    # The API validates these keys; re-checked here so no path around it can weaken the pods.
    bad = [k for k in annotations if is_reserved_annotation(k) or not is_qualified_name(k)]
    if bad:
        raise ConfigError(f"refusing pod annotations {bad}: reserved or not qualified names")
    return {
        "metadata": {
            "labels": labels(inputs.name, role, vname, inputs.settings.version),
            # A changed policy/config changes the hash, and so the template: the pods roll.
            "annotations": {**annotations, ANNOTATION_CONFIG_HASH: config_hash},
        },
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": copy.deepcopy(POD_SECURITY),
            "terminationGracePeriodSeconds": grace_seconds,
            "containers": [container],
            "volumes": volumes,
            **placement(spec_placement, selector),
        },
    }
