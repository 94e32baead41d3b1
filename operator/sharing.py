"""Cross-variant KV reuse (DroidSpeak) from the resources to the engines' plans (pure; lookups injected).

A ModelVariant declares `kvSharing` (manual layers, or auto from a profile in a ConfigMap); the fleet's
CachePolicy allows it with `prefixCache.scope: family`. For each declaring variant of a fleet this
module decides, with the reason: the `KVShareConfig` its engines apply, a status row, or a problem that
refuses the fleet (a sibling outside the fleet or of another family, a missing or mismatched profile,
a pair that does not run on one engine).

    plans, rows, problems = sharing_plans(variants, cache_policy, lookup)
    problems += split_pairs(plans, serving_groups(inputs))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvfleet.dataplane.config import KVShareConfig
from kvfleet.dataplane.kvsharing import DEFAULT_MAX_FRACTION, ProfileMismatch, SharingProfile
from kvfleet.operator.api import CachePolicySpec, ModelVariant

Lookup = Callable[[str, str], Mapping[str, Any] | None]

OFF_BY_POLICY = ("the fleet's CachePolicy keeps prefixes per variant (prefixCache.scope variant, or the prefix "
                 "cache off): set scope family to reuse a sibling's KV")


def profile_refs(variants: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """("ConfigMap", name) of every profile the raw ModelVariant bodies name (to fetch with them)."""
    out = []
    for body in variants:
        profile = (((body or {}).get("spec") or {}).get("kvSharing") or {}).get("profile") or {}
        if isinstance(profile, Mapping) and profile.get("configMap"):
            out.append(("ConfigMap", str(profile["configMap"])))
    return sorted(set(out))


def sharing_plans(variants: Sequence[ModelVariant], policy: CachePolicySpec,
                  lookup: Lookup) -> tuple[list[KVShareConfig], list[dict[str, Any]], list[str]]:
    """(plans for the engines, status rows of every declaring variant, problems that refuse the fleet)."""
    by_name = {v.metadata.name: v for v in variants}
    family = policy.prefix_cache.enabled and policy.prefix_cache.scope == "family"
    plans: list[KVShareConfig] = []
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for v in variants:
        ks, name = v.spec.kv_sharing, v.metadata.name
        if ks.mode == "none" or ks.from_variant is None:
            continue
        row: dict[str, Any] = {"variant": name, "fromVariant": ks.from_variant, "inEffect": False}
        rows.append(row)
        if not family:
            row["reason"] = OFF_BY_POLICY
            continue
        source = by_name.get(ks.from_variant)
        where = f"ModelVariant {name!r} kvSharing"
        if source is None:
            problems.append(f"{where}: fromVariant {ks.from_variant!r} is not a variant of this fleet")
            continue
        if source.spec.family != v.spec.family:
            problems.append(f"{where}: fromVariant {ks.from_variant!r} is of family {source.spec.family!r}, "
                            f"not {v.spec.family!r}")
            continue
        if ks.mode == "manual":
            plan = KVShareConfig(name, ks.from_variant, tuple(sorted(set(ks.recompute_layers))), "manual")
        else:
            got = _from_profile(v, lookup)
            if isinstance(got, str):
                problems.append(f"{where}: {got}")
                continue
            plan, ppl, reason = got
            row["pplIncrease"] = round(ppl, 6)
            if reason:
                row["reason"] = reason
                continue
        plans.append(plan)
        row.update(inEffect=True, recomputeLayers=list(plan.recompute_layers), source=plan.source)
    return plans, rows, problems


def _from_profile(v: ModelVariant, lookup: Lookup) -> tuple[KVShareConfig, float, str] | str:
    """(the plan the variant's profile selects, its measured perplexity change, why it stays off or ""), or
    why the profile cannot be used at all (which refuses the fleet)."""
    ks = v.spec.kv_sharing
    assert ks.profile is not None and ks.from_variant is not None
    ref = f"ConfigMap {ks.profile.config_map!r} key {ks.profile.key!r}"
    body = lookup("ConfigMap", ks.profile.config_map)
    if body is None:
        return f"profile {ref} not found in the namespace; create it from `kvfleet profile-sharing --out`"
    text = (body.get("data") or {}).get(ks.profile.key)
    if text is None:
        return f"profile {ref}: the key is missing"
    try:
        profile = SharingProfile.from_json(text)
        profile.check_pair(ks.from_variant, v.metadata.name, v.spec.family)
    except ProfileMismatch as e:
        return f"profile {ref} does not fit: {e}"
    fraction = ks.max_recompute_fraction or DEFAULT_MAX_FRACTION
    point, reason = profile.plan(fraction), ""
    if point is None:
        point = profile.closest(fraction)
        if point is None:
            return f"profile {ref} has no plan recomputing at most {fraction:.0%} of {profile.num_layers} layers"
        reason = (f"the profile has no plan recomputing at most {fraction:.0%} of {profile.num_layers} layers that "
                  f"keeps perplexity within {profile.quality_budget:.1%}; the closest, {len(point.layers)} layers, moves "
                  f"it {point.ppl_increase:+.2%} with token agreement {point.token_agreement:.3f}: sharing stays off")
    return KVShareConfig(v.metadata.name, ks.from_variant, tuple(sorted(point.layers)),
                         f"profile {ks.profile.config_map}/{ks.profile.key}", profile.num_layers,
                         profile.from_weights, profile.to_weights), point.ppl_increase, reason


def split_pairs(plans: Sequence[KVShareConfig], groups: Sequence[Any]) -> list[str]:
    """Problems for pairs whose variants run on different pods (each group: one engine's variants)."""
    home = {v.metadata.name: g.name for g in groups for v in g.variants}
    return [f"ModelVariant {p.variant!r} kvSharing: it runs on the {home.get(p.variant)!r} pods and "
            f"{p.from_variant!r} on the {home.get(p.from_variant)!r} pods; KV is reused across variants inside one "
            "engine (LoRA adapters of one base, or the base itself), reuse across pods through the memory pool "
            "is not implemented" for p in plans if home.get(p.variant) != home.get(p.from_variant)]
