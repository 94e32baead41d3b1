"""The planner's rules, one table per rule: pure calls, no cluster, no clock."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from kvfleet.operator.api.fleet import Autoscaling, RatioBand
from kvfleet.operator.builders.config import CACHE_POLICY_JSON, VARIANT_JSON, role_config_key
from kvfleet.operator.builders.serving import ServingGroup
from kvfleet.operator.builders.workloads import engine_deployment
from kvfleet.operator.planner import (
    Bounds,
    ClassWindow,
    Observation,
    Plan,
    PlannerState,
    RoleObservation,
    bounds_from_fleet,
    plan,
)
from op_testlib import inputs

POLICY = Autoscaling(interval_seconds=15, window_seconds=60, scale_down_stabilization_seconds=300)
WIDE = {r: Bounds(1, 40) for r in ("prefill", "decode", "engine", "mempool")}


def cls(name: str = "interactive", att: float = 1.0, *, ttft: float | None = None, tpot: float | None = None,
        target: float = 0.95, critical: bool = True, n: int = 200, p90: tuple[float, float] = (100.0, 20.0),
        slo_ms: tuple[float, float] | None = (1000.0, 100.0)) -> ClassWindow:
    ttft = att if ttft is None else ttft
    tpot = att if tpot is None else tpot
    targets = slo_ms or (None, None)
    return ClassWindow(name, n, ttft, tpot, min(ttft, tpot), target, critical, *p90, *targets)


def role(r: str = "decode", n: int = 4, ready: int | None = None, v: str = "m", **signals: float) -> RoleObservation:
    return RoleObservation(r, "" if r == "mempool" else v, n, n if ready is None else ready, **signals)  # type: ignore[arg-type]


def observe(roles: list[RoleObservation], classes: list[ClassWindow] | None = None, now: float = 1000.0,
            age: float | None = 2.0) -> Observation:
    return Observation(now=now, data_age_s=age, window_s=60.0, roles=roles, classes=classes or [])


def cond(p: Plan, type_: str) -> tuple[str, str] | None:
    return next(((c.status, c.reason) for c in p.conditions if c.type == type_), None)


def run(seq: list[Observation], bounds: dict[str, Bounds] = WIDE, policy: Autoscaling = POLICY) -> list[Plan]:
    """Feed observations in order, carrying the state and the replicas the previous plan chose."""
    state, plans, current = PlannerState(), [], {}
    for o in seq:
        roles = [dataclasses.replace(r, replicas=current.get(r.key, r.replicas), ready=current.get(r.key, r.ready))
                 for r in o.roles]
        p = plan(policy, bounds, dataclasses.replace(o, roles=roles), state)
        plans.append(p)
        state, current = p.state, p.replicas
    return plans


# -- breach -> up ------------------------------------------------------------------------------

@pytest.mark.parametrize("obs_role, classes, why", [
    (role("decode", kv_pressure=0.95), [], "KV pressure"),
    (role("decode", queue_depth=5.0), [], "queue"),
    (role("decode", kv_pressure=0.6), [cls(tpot=0.80)], "TPOT attainment"),
    (role("prefill", queue_depth=6.0), [], "queue"),
    (role("prefill"), [cls(ttft=0.70)], "TTFT attainment"),
    (role("engine", kv_pressure=0.9), [], "KV pressure"),
    (role("engine", queue_depth=8.0), [], "queue"),
    (role("engine", kv_pressure=0.5), [cls(ttft=0.99, tpot=0.6)], "TTFT+TPOT attainment"),
    (role("mempool", pool_hit_rate=0.4, pool_churn=2.0), [], "pool churn"),
    # latency headroom: attainment still met, but a critical p90 is past 80% of its target
    (role("prefill", queue_depth=0.0), [cls(p90=(900.0, 20.0))], "TTFT p90 at 90%"),
    (role("engine", kv_pressure=0.5), [cls(p90=(100.0, 95.0))], "TPOT p90 at 95%"),
])
def test_a_breach_scales_up_at_once(obs_role, classes, why):
    p = plan(POLICY, WIDE, observe([obs_role], classes), PlannerState())
    assert p.replicas[obs_role.key] > obs_role.replicas
    assert [e.reason for e in p.events] == ["ScaledUp"] and why in p.events[0].message
    assert cond(p, "Scaling") == ("True", "Scaled")


@pytest.mark.parametrize("obs_role, classes", [
    (role("decode", kv_pressure=0.95), [cls(ttft=0.1)]),  # decode ignores TTFT
    (role("prefill", kv_pressure=0.99), [cls(tpot=0.1)]),  # prefill ignores KV and TPOT
    (role("mempool", pool_hit_rate=0.95, pool_churn=2.0), []),  # churn at a high hit rate: more pool won't help
])
def test_each_role_follows_its_own_signals(obs_role, classes):
    p = plan(POLICY, WIDE, observe([obs_role], classes), PlannerState())
    want_up = obs_role.role == "decode"
    assert (p.replicas[obs_role.key] > obs_role.replicas) == want_up


def test_up_is_proportional_and_counts_starting_pods():
    first = plan(POLICY, WIDE, observe([role("prefill", 4)], [cls(ttft=0.85)]), PlannerState())
    assert first.replicas["m/prefill"] == 6  # ceil(4 * (1 + 4 * 0.105)), not just +1
    worse = plan(POLICY, WIDE, observe([role("prefill", 4)], [cls(ttft=0.2)]), PlannerState())
    assert worse.replicas["m/prefill"] == 8  # at most doubled (or +4) per call
    # Next interval: 6 desired, 4 ready, still breaching: the 2 loading pods count as bought.
    again = plan(POLICY, WIDE, observe([role("prefill", 6, ready=4)], [cls(ttft=0.85)], now=1015), first.state)
    assert again.replicas["m/prefill"] == 6 and not again.events


def test_a_backlog_asks_for_at_most_three_times_the_ready_pods():
    first = plan(POLICY, WIDE, observe([role("engine", 5, queue_depth=50.0)]), PlannerState())
    assert first.replicas["m/engine"] == 10  # 3x the ready pods, capped at 2x (or +4) the desired
    big = plan(POLICY, {"engine": Bounds(1, 400)}, observe([role("engine", 40, queue_depth=50.0)]), PlannerState())
    assert big.replicas["m/engine"] == 80


@pytest.mark.parametrize("obs_role, classes", [
    (role("engine", 10, kv_pressure=0.1, queue_depth=0.0), [cls(p90=(600.0, 20.0))]),  # TTFT p90 at 60%
    (role("decode", 10, kv_pressure=0.1), [cls(p90=(100.0, 70.0))]),  # TPOT p90 at 70%
    (role("decode", 10, kv_pressure=0.1), [cls(p90=(100.0, 70.0), critical=False)]),  # sheddable too
])
def test_no_scale_down_without_latency_headroom(obs_role, classes):
    plans = run([observe([obs_role], classes, now=1000 + 15 * i) for i in range(40)])
    assert {p.replicas[obs_role.key] for p in plans} == {10}


def test_latency_without_targets_is_ignored():
    plans = run([observe([role("decode", 10, kv_pressure=0.1)], [cls(p90=(5000.0, 500.0), slo_ms=None)],
                         now=1000 + 15 * i) for i in range(40)])
    assert plans[-1].replicas["m/decode"] < 10


@pytest.mark.parametrize("signals, classes", [
    ({"kv_pressure": 0.97}, []),
    ({"queue_depth": 9.0}, []),
    ({"kv_pressure": 0.6}, [cls(tpot=0.5)]),
])
def test_after_a_scale_up_loading_pods_count_as_bought(signals, classes):
    p = plan(POLICY, WIDE, observe([role("decode", 4, **signals)], classes), PlannerState())
    n = p.replicas["m/decode"]
    assert n > 4
    loading = plan(POLICY, WIDE, observe([role("decode", n, ready=4, **signals)], classes, now=1060), p.state)
    assert loading.replicas["m/decode"] == n
    # they serve and the signals have not eased: the step was too small, take another
    ready = plan(POLICY, WIDE, observe([role("decode", n, **signals)], classes, now=1100), loading.state)
    assert ready.replicas["m/decode"] > n


def test_a_falling_signal_after_a_scale_up_is_the_old_fleet_s_window():
    seq = [(1000, 4, 4, 0.97), (1060, 7, 4, 0.97), (1100, 7, 7, 0.93), (1115, 7, 7, 0.90), (1180, 7, 7, 0.88)]
    state, got = PlannerState(), []
    for now, n, ready, kv in seq:
        p = plan(POLICY, WIDE, observe([role("decode", n, ready=ready, kv_pressure=kv)], now=now), state)
        state = p.state
        got.append(p.replicas["m/decode"])
    assert got[:4] == [7, 7, 7, 7]  # ceil(4 x 0.97 / 0.625); then falling within a window of serving: hold
    assert got[4] > 7  # a window later, still above kvPressureHigh: step again


# -- good -> down only after the stabilisation window ------------------------------------------

@pytest.mark.parametrize("obs_role, classes", [
    (role("decode", 10, kv_pressure=0.1), [cls(att=1.0)]),
    (role("prefill", 10, queue_depth=0.0), [cls(att=1.0)]),
    (role("engine", 10, kv_pressure=0.2, queue_depth=0.1), [cls(att=0.99)]),
    (role("mempool", 10, pool_hit_rate=0.3, pool_churn=0.0), []),
])
def test_good_signals_scale_down_only_after_stabilisation(obs_role, classes):
    seq = [observe([obs_role], classes, now=1000 + 15 * i) for i in range(30)]
    plans = run(seq)
    first_down = next(i for i, p in enumerate(plans) if p.replicas[obs_role.key] < 10)
    assert 15 * first_down >= POLICY.scale_down_stabilization_seconds
    assert 15 * first_down <= POLICY.scale_down_stabilization_seconds + 15
    assert plans[first_down].replicas[obs_role.key] >= 8  # at most 20% per step
    downs = [i for i in range(1, 30) if plans[i].replicas[obs_role.key] < plans[i - 1].replicas[obs_role.key]]
    assert all(b - a >= 4 for a, b in zip(downs, downs[1:], strict=False))  # one step per 60 s window


@pytest.mark.parametrize("obs_role", [
    role("decode", 6, kv_pressure=0.1, queue_depth=1.0),  # queue between low and high: not good
    role("decode", 6, kv_pressure=0.6),  # KV pressure between low and high
    role("engine", 6, kv_pressure=0.1, queue_depth=1.5),
])
def test_neither_breach_nor_good_holds(obs_role):
    plans = run([observe([obs_role], [cls()], now=1000 + 15 * i) for i in range(40)])
    assert {p.replicas[obs_role.key] for p in plans} == {6}


# -- noisy signal: no flapping -----------------------------------------------------------------

@pytest.mark.parametrize("noisy", [
    [role("decode", 6, kv_pressure=kv) for kv in (0.2, 0.9)],
    [role("prefill", 6, queue_depth=q) for q in (0.0, 3.0)],
])
def test_a_noisy_alternating_signal_does_not_flap(noisy):
    seq = [observe([noisy[i % 2]], [cls(att=1.0)], now=1000 + 15 * i) for i in range(60)]
    counts = [p.replicas[noisy[0].key] for p in run(seq)]
    assert all(b >= a for a, b in zip(counts, counts[1:], strict=False)), counts  # never down again


def test_a_noisy_attainment_does_not_flap():
    seq = [observe([role("prefill", 6, queue_depth=0.0)], [cls(ttft=0.9 if i % 3 == 0 else 1.0)],
                   now=1000 + 15 * i) for i in range(60)]
    counts = [p.replicas["m/prefill"] for p in run(seq)]
    assert all(b >= a for a, b in zip(counts, counts[1:], strict=False)), counts  # never down again


# -- stale or missing data: hold and say so ----------------------------------------------------

@pytest.mark.parametrize("age, reason", [(None, "NoData"), (45.0, "Stale"), (600.0, "Stale")])
def test_stale_or_missing_data_holds_and_says_so(age, reason):
    roles = [role("decode", 5, kv_pressure=0.99), role("prefill", 3, queue_depth=9.0)]
    p = plan(POLICY, WIDE, observe(roles, [cls(att=0.1)], age=age), PlannerState())
    assert p.replicas == {"m/decode": 5, "m/prefill": 3} and not p.events
    assert cond(p, "TelemetryStale") == ("True", reason)
    assert cond(p, "Scaling") == ("False", "TelemetryStale")


def test_stale_data_does_not_count_as_good_for_a_scale_down():
    good = [observe([role("decode", 10, kv_pressure=0.1)], [cls()], now=1000 + 15 * i) for i in range(40)]
    good[10] = dataclasses.replace(good[10], data_age_s=None)
    plans = run(good)
    first_down = next(i for i, p in enumerate(plans) if p.replicas["m/decode"] < 10)
    assert first_down >= 11 + 20


def test_a_role_without_signals_holds_and_says_so():
    p = plan(POLICY, WIDE, observe([role("decode", 3), role("prefill", 2, queue_depth=9.0)]), PlannerState())
    assert p.replicas["m/decode"] == 3
    assert cond(p, "TelemetryIncomplete") == ("True", "MissingSignals")
    assert "m/decode" in next(c.message for c in p.conditions if c.type == "TelemetryIncomplete")


def test_fresh_data_says_so():
    p = plan(POLICY, WIDE, observe([role("decode", 3, kv_pressure=0.6)]), PlannerState())
    assert cond(p, "TelemetryStale") == ("False", "Fresh") and cond(p, "Scaling") == ("True", "Stable")


# -- ratio band, bounds, pins ------------------------------------------------------------------

BAND = Autoscaling(ratio=RatioBand(min_prefill_per_decode=0.5, max_prefill_per_decode=2.0))


@pytest.mark.parametrize("prefill, decode, bounds, want", [
    # prefill jumps to 12 on its queue: decode is raised to 6 to keep prefill/decode <= 2
    (role("prefill", 6, queue_depth=9.0), role("decode", 3, kv_pressure=0.6), WIDE, (12, 6)),
    # ... unless decode is at its max: then prefill is cut to 2 x decode
    (role("prefill", 6, queue_depth=9.0), role("decode", 3, kv_pressure=0.6),
     {**WIDE, "decode": Bounds(1, 4)}, (8, 4)),
    # decode jumps on KV pressure: prefill is raised to keep prefill/decode >= 0.5
    (role("prefill", 2, queue_depth=1.0), role("decode", 4, queue_depth=8.0), WIDE, (4, 8)),
    # ... unless prefill is at its max: then decode is cut to prefill / 0.5
    (role("prefill", 2, queue_depth=1.0), role("decode", 4, queue_depth=8.0),
     {**WIDE, "prefill": Bounds(1, 3)}, (3, 6)),
])
def test_the_ratio_band_is_enforced_both_ways(prefill, decode, bounds, want):
    p = plan(BAND, bounds, observe([prefill, decode]), PlannerState())
    assert (p.replicas["m/prefill"], p.replicas["m/decode"]) == want


def test_the_ratio_band_is_per_variant():
    roles = [role("prefill", 6, v="a", queue_depth=9.0), role("decode", 3, v="a", kv_pressure=0.6),
             role("prefill", 1, v="b", queue_depth=1.0), role("decode", 1, v="b", kv_pressure=0.6)]
    p = plan(BAND, WIDE, observe(roles), PlannerState())
    assert p.replicas == {"a/prefill": 12, "a/decode": 6, "b/prefill": 1, "b/decode": 1}


@pytest.mark.parametrize("obs_role, bounds, want, limited", [
    (role("decode", 4, kv_pressure=0.99), {"decode": Bounds(1, 4)}, 4, True),
    (role("decode", 4, queue_depth=40.0), {"decode": Bounds(1, 6)}, 6, True),
    (role("decode", 1, kv_pressure=0.6), {"decode": Bounds(3, 6)}, 3, False),  # raised to min
    (role("decode", 9, kv_pressure=0.6), {"decode": Bounds(1, 6)}, 6, False),  # cut to max
])
def test_min_and_max_clamp(obs_role, bounds, want, limited):
    p = plan(POLICY, bounds, observe([obs_role]), PlannerState())
    assert p.replicas["m/decode"] == want
    assert (cond(p, "ScalingLimited") == ("True", "AtBounds")) == limited


def test_good_signals_never_go_below_min():
    plans = run([observe([role("decode", 3, kv_pressure=0.0)], [cls()], now=1000 + 15 * i) for i in range(60)],
                bounds={"decode": Bounds(2, 8)})
    assert plans[-1].replicas["m/decode"] == 2


@pytest.mark.parametrize("obs_role, classes, age", [
    (role("decode", 4, kv_pressure=0.99), [cls(att=0.1)], 2.0),  # breach
    (role("decode", 4, kv_pressure=0.0), [cls()], 2.0),  # good
    (role("decode", 4, kv_pressure=0.99), [], None),  # no data
])
def test_a_pin_always_wins(obs_role, classes, age):
    seq = [observe([obs_role], classes, now=1000 + 15 * i, age=age) for i in range(40)]
    plans = run(seq, bounds={"decode": Bounds(1, 40, pinned=5)})
    assert {p.replicas["m/decode"] for p in plans} == {5}


def test_a_pinned_role_moves_the_other_one_into_the_band():
    p = plan(BAND, {**WIDE, "prefill": Bounds(1, 40, pinned=10)},
             observe([role("prefill", 10, queue_depth=0.0), role("decode", 2, kv_pressure=0.6)]), PlannerState())
    assert p.replicas == {"m/prefill": 10, "m/decode": 5}


def test_disabled_autoscaling_holds():
    p = plan(Autoscaling(enabled=False), WIDE, observe([role("decode", 4, kv_pressure=0.99)]), PlannerState())
    assert p.replicas["m/decode"] == 4 and cond(p, "Scaling") == ("False", "Disabled")


# -- critical classes dominate sheddable ones --------------------------------------------------

@pytest.mark.parametrize("classes, want", [
    ([cls("chat", ttft=0.85), cls("batch", att=1.0, critical=False)], 6),  # critical breach: proportional
    ([cls("chat", att=1.0), cls("batch", ttft=0.3, critical=False)], 5),  # sheddable breach: one pod
    ([cls("chat", ttft=0.85), cls("batch", ttft=0.1, critical=False)], 6),  # both: the critical one decides
    ([cls("chat", ttft=0.5, n=5), cls("batch", att=1.0, critical=False)], 4),  # 5 requests: not evidence
])
def test_a_critical_class_below_target_dominates_a_sheddable_one(classes, want):
    p = plan(POLICY, WIDE, observe([role("prefill", 4, queue_depth=0.0)], classes), PlannerState())
    assert p.replicas["m/prefill"] == want
    critical_breach = classes[0].ttft_attained < classes[0].target and classes[0].requests >= 20
    assert [("chat" in e.message) for e in p.events] == ([critical_breach] if want != 4 else [])


# -- the contract with the builders and the observe side ---------------------------------------

def test_plan_keys_are_what_the_builders_read():
    fin = inputs()
    variant = fin.variants[0]
    name = variant.metadata.name
    bounds = bounds_from_fleet(fin.fleet.spec)
    p = plan(fin.fleet.spec.autoscaling, bounds,
             observe([role("decode", 1, v=name, kv_pressure=0.99)]), PlannerState())
    key = f"{name}/decode"
    assert key in p.replicas
    fin = dataclasses.replace(fin, planned=p.replicas)
    data = {k: "" for k in (role_config_key("decode"), CACHE_POLICY_JSON, VARIANT_JSON)}
    dep = engine_deployment(fin, ServingGroup(variant), "decode", data)
    b = bounds["decode"]
    assert dep["spec"]["replicas"] == (b.pinned if b.pinned is not None else min(b.max, p.replicas[key]))


def test_the_planner_module_is_pure():
    src = Path(__file__).resolve().parents[2] / "operator" / "planner.py"
    names = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    assert not {n for n in names if any(bad in n for bad in ("kopf", "kubernetes", "torch", "time", "random"))}


# -- reading ahead: a rising signal is projected over the load time ----------------------------

@pytest.mark.parametrize("first, second, classes, rises", [
    ({"kv_pressure": 0.50}, {"kv_pressure": 0.70}, [], True),  # +0.2 in 15 s, 75 s ahead: far past 0.85
    ({"kv_pressure": 0.70}, {"kv_pressure": 0.50}, [], False),  # falling
    ({"kv_pressure": 0.60}, {"kv_pressure": 0.61}, [], False),  # flat
    ({"kv_pressure": 0.5}, {"kv_pressure": 0.5}, "rising-p90", True),  # TPOT p90 50% -> 70% of target
])
def test_a_rising_signal_scales_up_before_it_crosses_the_mark(first, second, classes, rises):
    c1 = [cls(p90=(100.0, 50.0))] if classes else []
    c2 = [cls(p90=(100.0, 70.0))] if classes else []
    a = plan(POLICY, WIDE, observe([role("decode", 10, **first)], c1), PlannerState())
    assert a.replicas["m/decode"] == 10
    b = plan(POLICY, WIDE, observe([role("decode", 10, **second)], c2, now=1015), a.state)
    assert (b.replicas["m/decode"] > 10) == rises
    if rises:
        assert "rising to" in b.events[0].message


def test_the_mempool_key_and_bounds_from_a_fleet():
    fin = inputs()
    bounds = bounds_from_fleet(fin.fleet.spec)
    spec = fin.fleet.spec
    assert bounds["mempool"] == Bounds(spec.mempool.replicas, spec.mempool.replicas, spec.mempool.replicas)
    assert bounds["decode"] == Bounds(spec.topology.decode.min_replicas, spec.topology.decode.max_replicas,
                                      spec.topology.decode.replicas)
    p = plan(POLICY, bounds, observe([role("mempool", 1, pool_hit_rate=0.2, pool_churn=3.0)]), PlannerState())
    assert p.replicas == {"mempool": spec.mempool.replicas}  # no API bounds for the pool yet: it holds


def test_a_role_without_bounds_holds_and_says_so():
    p = plan(POLICY, {"decode": Bounds(1, 9)}, observe([role("prefill", 3, queue_depth=9.0)]), PlannerState())
    assert p.replicas == {"m/prefill": 3}
    assert "m/prefill (no bounds)" in next(c.message for c in p.conditions if c.type == "TelemetryIncomplete")
