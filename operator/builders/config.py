"""Rendered configuration: the dataplane's EngineConfig per variant, plus router and pool config.

`dataplane/config.py` is the engine's own torch-free contract; the operator fills
it in and validates it here, so a value the engine would reject fails the
reconcile (Degraded, InvalidConfig) instead of crash-looping a pod.

The KV policy reaches the engine through `CachePolicyConfig.from_spec` (the
dataplane's own conversion of the resource); the full CachePolicy spec is also
rendered alongside as `cache-policy.json` (block size, prefix scope and pool
settings that EngineConfig does not carry).
"""

from __future__ import annotations

import json
from typing import Any

from kvfleet.dataplane import config as dpconfig
from kvfleet.dataplane.pool_config import PoolConfig
from kvfleet.operator.api import ModelVariant

from .inputs import FleetInputs
from .names import child_name, labels, owner_reference
from .serving import ServingGroup, serving_groups

CONFIG_DIR = "/etc/kvfleet"
MODELS_DIR = "/models"
CACHE_DIR = "/var/cache/kvfleet"
ENGINE_JSON = "engine.json"
CACHE_POLICY_JSON = "cache-policy.json"
VARIANT_JSON = "variant.json"
ROUTER_JSON = "router.json"
MEMPOOL_JSON = "mempool.json"

HTTP_PORT = 8080
GRPC_PORT = 50051
POOL_PORT = 50052
ROUTER_CONTAINER_PORT = 8000


def weights_dir(variant: ModelVariant, which: str = "base") -> str:
    """Where a variant's weights are inside the pod: a mounted volume, or the image's builtin cache."""
    if which == "base" or variant.spec.fine_tune is None:
        source = variant.spec.base
    else:
        source = variant.spec.fine_tune.weights
    if source.builtin:
        return f"{CACHE_DIR}/models/{source.builtin}"
    return f"{MODELS_DIR}/{variant.metadata.name}/{which}"


def _cache_policy_config(inputs: FleetInputs) -> dpconfig.CachePolicyConfig:
    """The KV policy as the engine reads it (the dataplane converts the resource's spec itself)."""
    policy = dpconfig.CachePolicyConfig.from_spec(inputs.cache_policy.to_k8s())
    # an eviction the serving engine cannot apply (or cannot hand from prefill to decode) fails here, not in pods
    policy.check_servable(disaggregated=inputs.fleet.spec.topology.mode == "disaggregated")
    return policy


def adapter_config(variant: ModelVariant, preload: bool = False) -> dpconfig.AdapterConfig:
    """A LoRA variant as the engine serves it on its group's base weights (`preload`: the fleet's
    `variants[].preload`)."""
    ft = variant.spec.fine_tune
    assert ft is not None and ft.type == "lora"
    return dpconfig.AdapterConfig(name=variant.metadata.name, dir=weights_dir(variant, "finetune"),
                                  rank=ft.lora_rank, alpha=ft.lora_alpha,
                                  served_name=variant.spec.served_model_name or variant.metadata.name,
                                  preload=preload)


def engine_config(inputs: FleetInputs, group: ServingGroup, role: str) -> dpconfig.EngineConfig:
    """The EngineConfig one prefill/decode/engine pod of `group` runs with (validated by the dataplane)."""
    variant = group.lead
    spec = inputs.engine_roles()[role]
    preloads = {ref.name: ref.preload for ref in inputs.fleet.spec.variants}
    classes = tuple(
        dpconfig.SLOClassConfig(
            name=c.metadata.name,
            ttft_ms=float(c.spec.ttft_ms),
            tpot_ms=float(c.spec.tpot_ms),
            priority=c.spec.priority,
            sheddable=c.spec.sheddable,
        )
        for c in inputs.slo_classes
    )
    host = group.host
    return dpconfig.EngineConfig(
        model_dir=weights_dir(variant),
        variant=host.metadata.name if host is not None else "",
        fine_tune_dir=weights_dir(host, "finetune") if host is not None and host.spec.fine_tune else None,
        adapters=tuple(adapter_config(a, preloads.get(a.metadata.name, False)) for a in group.adapters),
        dtype=variant.spec.dtype,
        block_size=inputs.cache_policy.block_size_tokens,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=variant.spec.max_model_len,
        enable_prefix_caching=inputs.cache_policy.prefix_cache.enabled,
        slo_classes=classes,
        default_slo_class=inputs.fleet.spec.default_slo_class,
        cache_policy=_cache_policy_config(inputs),
        kv_sharing=tuple(p for p in inputs.kv_sharing
                         if {p.variant, p.from_variant} <= {v.metadata.name for v in group.variants}),
    )


def _dump(data: Any) -> str:
    return json.dumps(data, sort_keys=True, indent=2)


def variant_config_data(inputs: FleetInputs, group: ServingGroup) -> dict[str, str]:
    """ConfigMap data for one serving group: one engine JSON per serving role, the cache policy, the variant
    (the host's; `servedModelName` null when the group serves only adapters, listed under `adapters`)."""
    variant = group.lead
    data: dict[str, str] = {}
    for role in inputs.engine_roles():
        cfg = engine_config(inputs, group, role)
        # Round-trip through the dataplane's own parser: what we write is what the pod will accept.
        dpconfig.EngineConfig.from_json(cfg.to_json())
        data[role_config_key(role)] = cfg.to_json()
    data[CACHE_POLICY_JSON] = _dump(inputs.cache_policy.to_k8s())
    host = group.host
    variant_doc: dict[str, Any] = {
        "name": variant.metadata.name,
        "servedModelName": (host.spec.served_model_name or host.metadata.name) if host is not None else None,
        "spec": variant.spec.to_k8s(),
        "weightsDir": weights_dir(variant),
        "adapters": [a.metadata.name for a in group.adapters],
    }
    if host is not None and host.spec.fine_tune is not None:
        variant_doc["fineTuneDir"] = weights_dir(host, "finetune")
    data[VARIANT_JSON] = _dump(variant_doc)
    return data


def role_config_key(role: str) -> str:
    """ConfigMap key of a serving role's EngineConfig; mounted as /etc/kvfleet/engine.json in its pods."""
    return ENGINE_JSON if role == "engine" else f"{role}.{ENGINE_JSON}"


def fleet_config_data(inputs: FleetInputs) -> dict[str, str]:
    """ConfigMap data shared by the fleet: the router's map of models/classes and the pool's settings."""
    fleet, ns = inputs.name, inputs.namespace
    spec = inputs.fleet.spec
    roles = list(inputs.engine_roles())
    group_of = {v.metadata.name: g for g in serving_groups(inputs) for v in g.variants}
    router = {
        "fleet": fleet,
        "namespace": ns,
        "port": ROUTER_CONTAINER_PORT,
        "maxQueuedRequests": spec.router.max_queued_requests,
        "routing": spec.router.routing.to_k8s(),
        "topology": spec.topology.mode,
        "defaultSloClass": spec.default_slo_class,
        "sloClasses": [{"name": c.metadata.name, **c.spec.to_k8s()} for c in inputs.slo_classes],
        "models": [
            {
                "model": v.spec.served_model_name or v.metadata.name,
                "variant": v.metadata.name,
                "family": v.spec.family,
                # the router tokenizes: the variant's weights (or the builtin it materialises)
                "weightsDir": weights_dir(v),
                "builtin": v.spec.base.builtin,
                # the pods serving it (a LoRA variant's group is its base's in a colocated fleet)
                "servedBy": group_of[v.metadata.name].name,
                "parent": _parent(group_of[v.metadata.name], v),
                # Pods are discovered from the API by these labels, never by fixed addresses.
                "roles": {r: {"selector": {"kvfleet.io/fleet": fleet, "kvfleet.io/role": r,
                                           "kvfleet.io/variant": group_of[v.metadata.name].name},
                              "grpcPort": GRPC_PORT} for r in roles},
            }
            for v in inputs.variants
        ],
        "mempool": _pool_address(inputs),
    }
    data = {ROUTER_JSON: _dump(router)}
    if inputs.pool_enabled:
        pool = inputs.cache_policy.pool
        replicas = spec.mempool.replicas
        mempool = {
            "fleet": fleet,
            "port": POOL_PORT,
            "replicas": replicas,
            "capacityBytesPerReplica": pool.capacity_bytes // replicas,
            "highWatermark": pool.high_watermark,
            "blockSizeTokens": inputs.cache_policy.block_size_tokens,
            "kvDtype": inputs.cache_policy.quantization.dtype,
            # SLOClass kvPinning: the pool pins each class's blocks up to its per-pod cap
            "pinning": {c.metadata.name: c.spec.kv_pinning.max_pinned_bytes
                        for c in inputs.slo_classes if c.spec.kv_pinning.enabled},
        }
        try:  # the pool's own reading of it: pins that cannot fit fail the reconcile, not the pod
            PoolConfig.from_dict(mempool)
        except ValueError as e:
            raise dpconfig.ConfigError(f"memory pool: {e}") from e
        data[MEMPOOL_JSON] = _dump(mempool)
    return data


def _parent(group: ServingGroup, variant: ModelVariant) -> str | None:
    """The served name of the model a LoRA variant runs on, when the fleet serves that model too."""
    if group.host is None or variant is group.host:
        return None
    return group.host.spec.served_model_name or group.host.metadata.name


def _pool_address(inputs: FleetInputs) -> dict[str, Any] | None:
    if not inputs.pool_enabled:
        return None
    svc = child_name(inputs.name, "mempool")
    return {"service": f"{svc}.{inputs.namespace}.svc", "port": POOL_PORT,
            "replicas": inputs.fleet.spec.mempool.replicas}


def config_map(inputs: FleetInputs, name: str, data: dict[str, str], variant: str | None = None) -> dict[str, Any]:
    """A ConfigMap owned by the fleet."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": inputs.namespace,
            "labels": labels(inputs.name, "config", variant, inputs.settings.version),
            "ownerReferences": [owner_reference(dict(inputs.fleet_body))],
        },
        "data": data,
    }
