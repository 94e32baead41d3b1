"""The pure builders, by value: roles, labels, GPUs, placement, probes, security, config and its hash."""

from __future__ import annotations

import copy
import json

import pytest
from kvfleet.dataplane.config import AdapterConfig, EngineConfig
from kvfleet.operator.builders import desired_objects, desired_replicas, router_endpoint
from kvfleet.operator.builders.names import ANNOTATION_CONFIG_HASH, child_name
from op_testlib import chat_fleet, colocated, inputs, objects_by_key


def by_name(objs):
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def container(obj):
    return obj["spec"]["template"]["spec"]["containers"][0]


def test_disaggregated_fleet_has_prefill_decode_per_serving_group_plus_pool_and_router():
    objs = by_name(desired_objects(inputs()))
    # the LoRA variant smollm2-support rides on its base's prefill/decode pods: one group, one set of workloads
    assert set(objs) == {
        ("ConfigMap", "chat-config"),
        ("ConfigMap", "chat-smollm2-base-config"),
        ("Deployment", "chat-smollm2-base-prefill"),
        ("Deployment", "chat-smollm2-base-decode"),
        ("StatefulSet", "chat-mempool"),
        ("Service", "chat-mempool"),
        ("Deployment", "chat-router"),
        ("Service", "chat-router"),
        ("ServiceAccount", "chat-router"),
        ("Role", "chat-router"),
        ("RoleBinding", "chat-router"),
    }
    router = objs[("Deployment", "chat-router")]["spec"]["template"]["spec"]
    assert router["serviceAccountName"] == "chat-router" and router["automountServiceAccountToken"] is True
    assert objs[("Role", "chat-router")]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]  # discovery, nothing else
    assert all(not container(d).get("command") or "automountServiceAccountToken" not in d["spec"]["template"]["spec"]
               or d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
               for (k, n), d in objs.items() if k == "Deployment" and n != "chat-router")
    decode = objs[("Deployment", "chat-smollm2-base-decode")]
    assert decode["spec"]["replicas"] == 2  # minReplicas, nothing planned yet
    assert container(decode)["command"] == [
        "python", "-m", "kvfleet.dataplane.roles.decode", "--config", "/etc/kvfleet/engine.json"]
    assert objs[("Service", "chat-mempool")]["spec"]["clusterIP"] == "None"
    assert objs[("StatefulSet", "chat-mempool")]["spec"]["serviceName"] == "chat-mempool"


def test_two_plain_variants_get_two_sets_of_prefill_and_decode():
    objects = objects_by_key()
    other = copy.deepcopy(objects[("ModelVariant", "smollm2-base")])
    other["metadata"]["name"] = "smollm2-other"
    other["spec"]["servedModelName"] = "smollm2-other"
    objects[("ModelVariant", "smollm2-other")] = other
    fleet = chat_fleet()
    fleet["spec"]["variants"].append({"name": "smollm2-other"})
    objs = by_name(desired_objects(inputs(fleet, objects)))
    # the LoRA variant joins the first plain variant's group; the second plain variant has pods of its own
    assert sorted(n for k, n in objs if k == "Deployment") == [
        "chat-router", "chat-smollm2-base-decode", "chat-smollm2-base-prefill",
        "chat-smollm2-other-decode", "chat-smollm2-other-prefill"]
    for group, adapters in (("smollm2-base", ["smollm2-support"]), ("smollm2-other", [])):
        data = objs[("ConfigMap", f"chat-{group}-config")]["data"]
        for role in ("prefill", "decode"):
            assert container(objs[("Deployment", f"chat-{group}-{role}")])["command"][2] == \
                f"kvfleet.dataplane.roles.{role}"
            cfg = EngineConfig.from_json(data[f"{role}.engine.json"])
            assert cfg.variant == group and [a.name for a in cfg.adapters] == adapters
    router = json.loads(objs[("ConfigMap", "chat-config")]["data"]["router.json"])
    assert [(m["variant"], m["servedBy"], m["roles"]["decode"]["selector"]["kvfleet.io/variant"])
            for m in router["models"]] == [("smollm2-base", "smollm2-base", "smollm2-base"),
                                           ("smollm2-support", "smollm2-base", "smollm2-base"),
                                           ("smollm2-other", "smollm2-other", "smollm2-other")]


def test_colocated_fleet_has_one_engine_per_variant_and_no_prefill_or_decode():
    objs = by_name(desired_objects(inputs(colocated(chat_fleet()))))
    deployments = sorted(n for k, n in objs if k == "Deployment")
    # the LoRA variant smollm2-support rides on its base's engine pods (tests/operator/test_serving.py)
    assert deployments == ["chat-router", "chat-smollm2-base-engine"]
    assert container(objs[("Deployment", "chat-smollm2-base-engine")])["command"][2] == "kvfleet.dataplane.roles.engine"


def test_pool_only_when_the_cache_policy_enables_it():
    fleet = colocated(chat_fleet())
    fleet["spec"]["cachePolicy"] = "long-context"  # evicts: colocated only
    kinds = {o["kind"] for o in desired_objects(inputs(fleet))}
    assert "StatefulSet" not in kinds
    fleet["spec"].pop("cachePolicy")  # the default policy has no pool either
    assert "StatefulSet" not in {o["kind"] for o in desired_objects(inputs(fleet))}


def test_labels_selectors_and_owner_reference():
    for obj in desired_objects(inputs()):
        labels = obj["metadata"]["labels"]
        assert labels["kvfleet.io/fleet"] == "chat"
        assert labels["app.kubernetes.io/managed-by"] == "kvfleet-operator"
        assert labels["app.kubernetes.io/instance"] == "chat"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "kvfleet.io/v1alpha1", "kind": "InferenceFleet", "name": "chat",
                         "uid": "uid-chat", "controller": True, "blockOwnerDeletion": True}
        if obj["kind"] in ("Deployment", "StatefulSet"):
            sel = obj["spec"]["selector"]["matchLabels"]
            assert sel.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
            assert sel["kvfleet.io/role"] == labels["kvfleet.io/role"] == labels["app.kubernetes.io/component"]
    objs = by_name(desired_objects(inputs()))
    router = json.loads(objs[("ConfigMap", "chat-config")]["data"]["router.json"])
    for role in ("prefill", "decode"):
        # the group's pods carry the group's (the base variant's) name, and the router finds the LoRA
        # variant's pods by exactly that selector
        dep = objs[("Deployment", f"chat-smollm2-base-{role}")]
        assert dep["spec"]["selector"]["matchLabels"] == {
            "kvfleet.io/fleet": "chat", "kvfleet.io/role": role, "kvfleet.io/variant": "smollm2-base"}
        for model in router["models"]:
            assert model["roles"][role]["selector"] == dep["spec"]["selector"]["matchLabels"], model["variant"]


def test_gpu_requests_limits_tolerations_and_node_selector_from_the_spec():
    objs = by_name(desired_objects(inputs()))
    prefill = objs[("Deployment", "chat-smollm2-base-prefill")]
    res = container(prefill)["resources"]
    assert res["requests"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1}
    assert res["limits"] == {"memory": "8Gi", "nvidia.com/gpu": 1}
    pod = prefill["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in objs[("Deployment", "chat-smollm2-base-decode")]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(container(objs[("Deployment", "chat-router")])["resources"])


def test_a_gpu_request_without_limit_gets_the_equal_limit():
    fleet = chat_fleet()
    fleet["spec"]["topology"]["decode"]["resources"] = {"requests": {"nvidia.com/gpu": 2}}
    decode = by_name(desired_objects(inputs(fleet)))[("Deployment", "chat-smollm2-base-decode")]
    assert container(decode)["resources"] == {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}}


def test_probes_and_hardened_security_context_on_every_pod():
    for obj in desired_objects(inputs()):
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = obj["spec"]["template"]["spec"]
        c = container(obj)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert "http" in {p["name"] for p in c["ports"]}
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert {"/tmp", "/var/cache/kvfleet"} <= {m["mountPath"] for m in c["volumeMounts"]}


def test_otel_env_points_at_the_operator_receiver_and_the_users_collector():
    env = {e["name"]: e.get("value") for e in container(desired_objects(inputs())[3])["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://kvfleet-otlp.sys.svc:4317"
    assert env["KVFLEET_OTLP_USER_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert "kvfleet.fleet=chat" in env["OTEL_RESOURCE_ATTRIBUTES"]


def test_engine_config_is_the_dataplane_config_and_round_trips():
    objs = by_name(desired_objects(inputs()))
    data = objs[("ConfigMap", "chat-smollm2-base-config")]["data"]
    assert set(data) == {"prefill.engine.json", "decode.engine.json", "cache-policy.json", "variant.json"}
    cfg = EngineConfig.from_json(data["decode.engine.json"])
    # the base group of a disaggregated fleet: the base served by name + the LoRA variant's adapter
    support = AdapterConfig("smollm2-support", "/models/smollm2-support/finetune", 16, 32.0,
                            served_name="smollm2-support")
    assert cfg.variant == "smollm2-base" and cfg.block_size == 16 and cfg.max_num_seqs == 128
    assert cfg.fine_tune_dir is None and cfg.adapters == (support,)
    assert [c.name for c in cfg.slo_classes] == ["interactive", "batch"] and cfg.default_slo_class == "interactive"
    prefill = EngineConfig.from_json(data["prefill.engine.json"])
    assert prefill.max_num_batched_tokens == 4096 and prefill.adapters == (support,)  # prefill applies it too
    assert EngineConfig.from_json(cfg.to_json()) == cfg and EngineConfig.from_json(prefill.to_json()) == prefill
    assert json.loads(data["cache-policy.json"])["quantization"]["dtype"] == "int8"
    variant = json.loads(data["variant.json"])
    assert variant["servedModelName"] == "smollm2" and variant["adapters"] == ["smollm2-support"]
    for role in ("prefill", "decode"):
        mounts = {m["mountPath"]: m for m in container(objs[("Deployment", f"chat-smollm2-base-{role}")])["volumeMounts"]}
        assert mounts["/etc/kvfleet/engine.json"]["subPath"] == f"{role}.engine.json"
        assert mounts["/models/smollm2-support/finetune"]["subPath"] == "support-v3"
    router = json.loads(objs[("ConfigMap", "chat-config")]["data"]["router.json"])
    assert [(m["model"], m["servedBy"], m["parent"]) for m in router["models"]] == [
        ("smollm2", "smollm2-base", None), ("smollm2-support", "smollm2-base", "smollm2")]
    assert router["mempool"]["service"] == "chat-mempool.ml.svc"


def _hashes(inp):
    return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CONFIG_HASH]
            for o in desired_objects(inp) if o["kind"] in ("Deployment", "StatefulSet")}


def test_config_hash_changes_when_the_policy_changes_and_only_then():
    objects = objects_by_key()
    before = _hashes(inputs(objects=objects))
    assert before == _hashes(inputs(objects=copy.deepcopy(objects)))  # deterministic
    changed = copy.deepcopy(objects)
    changed[("CachePolicy", "int8-shared")]["spec"]["blockSizeTokens"] = 32
    after = _hashes(inputs(objects=changed))
    assert set(before) == {"chat-smollm2-base-prefill", "chat-smollm2-base-decode", "chat-mempool", "chat-router"}
    for name in ("chat-smollm2-base-prefill", "chat-smollm2-base-decode"):  # the LoRA variant's pods too
        assert before[name] != after[name]
    assert before["chat-router"] == after["chat-router"]  # the router config did not change


def test_builders_are_deterministic():
    assert desired_objects(inputs()) == desired_objects(inputs())


@pytest.mark.parametrize(("spec", "planned", "want"), [
    ({"minReplicas": 2, "maxReplicas": 8}, None, 2),
    ({"minReplicas": 2, "maxReplicas": 8}, 5, 5),
    ({"minReplicas": 2, "maxReplicas": 8}, 50, 8),
    ({"minReplicas": 2, "maxReplicas": 8}, 0, 2),
    ({"minReplicas": 2, "maxReplicas": 8, "replicas": 3}, 7, 3),
])
def test_replicas_within_bounds_and_a_pinned_count_wins(spec, planned, want):
    from kvfleet.operator.api.fleet import RoleSpec

    assert desired_replicas(RoleSpec.model_validate(spec), planned) == want


def test_planner_annotation_is_clamped_into_the_bounds():
    fleet = chat_fleet()
    # keys name the serving group (the pods' variant label); smollm2-support has no workloads of its own,
    # so a key naming it scales nothing
    fleet["metadata"]["annotations"] = {"kvfleet.io/planned-replicas": json.dumps(
        {"smollm2-base/decode": 6, "smollm2-base/prefill": 99, "smollm2-support/decode": 1})}
    objs = by_name(desired_objects(inputs(fleet)))
    assert objs[("Deployment", "chat-smollm2-base-decode")]["spec"]["replicas"] == 6
    assert objs[("Deployment", "chat-smollm2-base-prefill")]["spec"]["replicas"] == 4  # maxReplicas
    fleet["metadata"]["annotations"] = {"kvfleet.io/planned-replicas": json.dumps({"smollm2-base/decode": 99})}
    objs = by_name(desired_objects(inputs(fleet)))
    assert objs[("Deployment", "chat-smollm2-base-decode")]["spec"]["replicas"] == 8  # maxReplicas
    assert objs[("Deployment", "chat-smollm2-base-prefill")]["spec"]["replicas"] == 1  # minReplicas, unplanned


def test_long_names_are_shortened_stably():
    name = child_name("f" * 40, "v" * 40, "prefill")
    assert len(name) <= 63 and name == child_name("f" * 40, "v" * 40, "prefill")
    assert name != child_name("f" * 40, "v" * 40, "decode")


def test_router_service_and_endpoint():
    inp = inputs()
    svc = by_name(desired_objects(inp))[("Service", "chat-router")]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert router_endpoint(inp) == "http://chat-router.ml.svc:8000/v1"


def test_kv_policy_reaches_the_engine_config():
    fleet = colocated(chat_fleet())
    fleet["spec"]["cachePolicy"] = "long-context"
    data = by_name(desired_objects(inputs(fleet)))[("ConfigMap", "chat-smollm2-base-config")]["data"]
    policy = EngineConfig.from_json(data["engine.json"]).cache_policy
    assert (policy.key_quantization, policy.eviction, policy.eviction_budget_ratio) == ("int4", "keydiff", 0.5)


def test_lookahead_and_rotated_keys_reach_the_engine_config():
    objects = objects_by_key()
    spec = objects[("CachePolicy", "long-context")]["spec"]
    spec["quantization"]["rotateKeys"] = True
    spec["eviction"] = {**spec["eviction"], "policy": "lookahead", "budgetRatio": 0.7, "lookaheadDir": "/models/lookahead"}
    fleet = colocated(chat_fleet())
    fleet["spec"]["cachePolicy"] = "long-context"
    data = by_name(desired_objects(inputs(fleet, objects=objects)))[("ConfigMap", "chat-smollm2-base-config")]["data"]
    policy = EngineConfig.from_json(data["engine.json"]).cache_policy
    assert (policy.eviction, policy.lookahead_dir, policy.rotate_keys) == ("lookahead", "/models/lookahead", True)


def test_a_disaggregated_fleet_refuses_eviction_with_the_field():
    """Prefill hands KV to decode without the eviction state: refused, never rendered and dropped."""
    from kvfleet.dataplane.config import ConfigError

    fleet = chat_fleet()
    fleet["spec"]["cachePolicy"] = "long-context"
    with pytest.raises(ConfigError, match=r"cache_policy\.eviction: 'keydiff': a disaggregated fleet"):
        desired_objects(inputs(fleet))


def test_pod_annotations_from_the_spec_reach_every_pod_but_never_the_config_hash():
    fleet = chat_fleet()
    fleet["spec"]["podAnnotations"] = {"kvfleet.io/run-locally": "true", ANNOTATION_CONFIG_HASH: "forged"}
    workloads = [o for o in desired_objects(inputs(fleet)) if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) >= 4
    for obj in workloads:
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
        assert annotations["kvfleet.io/run-locally"] == "true"
        assert annotations[ANNOTATION_CONFIG_HASH] not in ("forged", "")


def test_role_pod_annotations_apply_to_that_role_only():
    fleet = chat_fleet()
    fleet["spec"]["podAnnotations"] = {"team": "ml", "kvfleet.io/run-locally": "false"}
    fleet["spec"]["topology"]["decode"]["podAnnotations"] = {"kvfleet.io/run-locally": "true"}
    objs = by_name(desired_objects(inputs(fleet)))
    decode = objs[("Deployment", "chat-smollm2-base-decode")]["spec"]["template"]["metadata"]["annotations"]
    prefill = objs[("Deployment", "chat-smollm2-base-prefill")]["spec"]["template"]["metadata"]["annotations"]
    assert decode["kvfleet.io/run-locally"] == "true" and decode["team"] == "ml"
    assert prefill["kvfleet.io/run-locally"] == "false" and prefill["team"] == "ml"


@pytest.mark.parametrize("eviction", [{"policy": "h2o", "budgetRatio": 0.5, "pyramid": True},
                                      {"policy": "keydiff", "budgetRatio": 0.5, "pyramid": True}])
def test_a_policy_the_serving_engine_cannot_apply_fails_the_build_with_the_field(eviction):
    from kvfleet.dataplane.config import ConfigError

    objects = objects_by_key()
    objects[("CachePolicy", "int8-shared")]["spec"]["eviction"] = eviction
    objects[("CachePolicy", "int8-shared")]["spec"]["prefixCache"] = {"scope": "variant"}
    objects[("CachePolicy", "int8-shared")]["spec"]["quantization"]["keyGranularity"] = "per-token"  # eviction
    objects[("CachePolicy", "int8-shared")]["spec"]["pool"] = {"enabled": False}  # the pool refuses eviction
    with pytest.raises(ConfigError, match=r"cache_policy\.(eviction|pyramid)"):
        desired_objects(inputs(colocated(chat_fleet()), objects=objects))
    eviction = {**eviction, "policy": "streaming-llm", "pyramid": False}
    objects[("CachePolicy", "int8-shared")]["spec"]["eviction"] = eviction
    assert desired_objects(inputs(colocated(chat_fleet()), objects=objects))
