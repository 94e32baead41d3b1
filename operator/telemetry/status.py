"""A fleet's measured service, as status fields (pure): attainment, KV pressure, goodput, tokenomics.

    telemetry_status(window, window_s, classes, gpus, gpu_hour_cost_usd) -> {"attainment": ..., ...}

`window` is what the receiver aggregated over the planner's window (`window.FleetWindow`); the
classes are the fleet's SLO class names (a class with no finished request shows zeros, never a
made-up figure). Cost per million tokens is the fleet's GPU cost over the window divided by the
output tokens it produced in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kvfleet.operator.api.fleet import ClassStatus

from .window import FleetWindow


def telemetry_status(window: FleetWindow, window_s: float, classes: Iterable[str], gpus: int,
                     gpu_hour_cost_usd: float | None) -> dict[str, Any]:
    """The status fields owned by observation (camelCase, as the CRD stores them)."""
    by = {c.name: c for c in window.classes}
    out_tokens = window.output_tokens
    cost = None
    if gpu_hour_cost_usd is not None and out_tokens > 0:
        cost = gpu_hour_cost_usd * gpus * window_s / 3600 / (out_tokens / 1e6)
    rows: list[dict[str, Any]] = []
    for name in classes:
        c = by.get(name)
        row: dict[str, Any] = {"name": name, "requests": c.requests if c else 0,
                               "attainment": round(c.attainment, 4) if c and c.attainment is not None else 0.0,
                               "goodputRps": round(c.attained / window_s, 4) if c else 0.0}
        if c and c.ttft_p90_ms is not None:
            row["ttftMs"] = c.ttft_p90_ms
        if c and c.tpot_p90_ms is not None:
            row["tpotMs"] = c.tpot_p90_ms
        if cost is not None:
            row["costPerMillionTokensUsd"] = round(cost, 4)
        rows.append(ClassStatus.model_validate(row).to_k8s())  # the typed status model is the shape
    seen = [r["attainment"] for r in rows if r["requests"]]
    kv = [r.kv_pressure for r in window.roles if r.role in ("decode", "engine") and r.kv_pressure is not None]
    pool = next((r for r in window.roles if r.role == "mempool"), None)
    fields = {
        "poolHitRate": round(pool.pool_hit_rate, 4) if pool and pool.pool_hit_rate is not None else None,
        "poolBytes": int(pool.pool_bytes) if pool and pool.pool_bytes is not None else None,
        "sloClasses": rows,
        "attainment": min(seen) if seen else None,
        "kvPressure": round(sum(kv) / len(kv), 4) if kv else None,
        "tokensPerSecondPerGpu": round(out_tokens / window_s / gpus, 3) if gpus and window.data_age_s is not None
        else None,
    }
    return {k: v for k, v in fields.items() if v is not None}  # unknown: left out (the schema has no null)


def kv_by_role(window: FleetWindow) -> dict[str, float]:
    """Mean KV utilisation per role over its pods (variants of one role averaged by pod count)."""
    acc: dict[str, list[float]] = {}
    for r in window.roles:
        if r.kv_pressure is not None:
            a = acc.setdefault(r.role, [0.0, 0.0])
            a[0] += r.kv_pressure * r.pods
            a[1] += r.pods
    return {role: round(total / pods, 4) for role, (total, pods) in acc.items() if pods}


def gpus_of(workloads: Iterable[dict[str, Any]]) -> int:
    """GPUs the fleet holds: replicas x nvidia.com/gpu limit of each workload's containers."""
    total = 0
    for w in workloads:
        spec = w.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        for c in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
            limits = (c.get("resources") or {}).get("limits") or {}
            total += replicas * int(limits.get("nvidia.com/gpu", 0) or 0)
    return total
