"""The planner: (autoscaling policy, replica bounds, a typed observation, its own state) -> a plan.

Pure: only the standard library and the API models (no operator framework, no API
client, no engine, no clock). The observe side (the OTLP receiver's sliding-window
aggregates) builds an `Observation`; the operator calls `plan()` every `intervalSeconds`, writes `Plan.replicas` into the fleet's
planned-replicas annotation (keys as `builders.inputs.FleetInputs.planned`
reads them: "<variant>/<role>", or "<role>" for the fleet-wide mempool), its
conditions into status and its events as Events on the fleet, and keeps
`Plan.state` for the next call.

Rules:
- Prefill follows TTFT attainment and prefill queueing; decode follows KV
  pressure, TPOT attainment and requests waiting for KV room; the mempool
  follows hit rate and churn; a colocated engine follows all of them.
- A critical class (not sheddable) below its attainment target asks for a
  proportional step; a sheddable class below target asks for one replica at a
  time (the router may shed it under overload; it does not buy capacity in bulk).
- Latency headroom (a critical class's p90 against its ttftMs / tpotMs) warns
  before attainment breaks: above `Tuning.latency_high` of the target it asks
  for a step up, and a scale-down needs it below `Tuning.latency_low`.
- New pods take a model load to help, so KV pressure and latency headroom are
  also read ahead: a rising signal is projected over (the load time the planner
  last saw + one interval) and scales up when the projection crosses the high
  mark. Steps aim at the middle of the band, not just below its top.
- Up is fast: one breaching observation scales up, proportionally, from the
  *ready* replicas. Pods still loading count as bought (no step while they
  load). Every signal is a window aggregate, so for one window after they
  serve it partly describes the fleet before them: a further step then needs
  signals that are not falling (the fleet simulator showed backlog-driven
  second steps buying 5x what a burst needed).
- Down is slow: a role scales down only after every one of its signals has
  been good without a break for `scaleDownStabilizationSeconds` (and that long
  after its last scale-up), by at most `Tuning.max_down_fraction` of its pods
  (at least one) per step, one step per window so the window sees the smaller
  fleet before the next. A noisy signal that breaches now and then restarts
  the stabilisation each time: no flapping.
- Missing or stale data holds every role where it is and says so
  (`TelemetryStale` condition); a role without any signal of its own holds too.
- Within min..max, then the prefill:decode ratio band per variant (raising the
  lagging role rather than cutting the leading one where bounds allow); a
  pinned `replicas` always wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from kvfleet.operator.api.fleet import Autoscaling, InferenceFleetSpec

PlannedRole = Literal["prefill", "decode", "engine", "mempool"]


@dataclass(frozen=True)
class ClassWindow:
    """One SLO class over the observation window (fractions are of finished requests)."""

    name: str
    requests: int
    ttft_attained: float  # fraction meeting ttftMs
    tpot_attained: float  # fraction meeting tpotMs
    attained: float  # fraction meeting both (DistServe goodput)
    target: float  # the class's attainmentTarget
    critical: bool  # not sheddable
    ttft_p90_ms: float | None = None
    tpot_p90_ms: float | None = None
    ttft_target_ms: float | None = None  # the class's ttftMs, so the p90s can be read as headroom
    tpot_target_ms: float | None = None  # the class's tpotMs


@dataclass(frozen=True)
class RoleObservation:
    """One role of one variant ("" for the fleet-wide mempool) over the window."""

    role: PlannedRole
    variant: str
    replicas: int  # currently desired
    ready: int
    kv_pressure: float | None = None  # mean KV utilisation 0..1
    queue_depth: float | None = None  # mean waiting requests per pod
    pool_hit_rate: float | None = None  # 0..1, mempool
    pool_churn: float | None = None  # pool capacity evicted per window (0 = nothing evicted), mempool

    @property
    def key(self) -> str:
        """The planned-replicas key: "<variant>/<role>", or "<role>" when fleet-wide."""
        return f"{self.variant}/{self.role}" if self.variant else self.role


@dataclass(frozen=True)
class Observation:
    """What the receiver aggregated; `data_age_s` is None when no span arrived at all."""

    now: float
    data_age_s: float | None
    window_s: float
    roles: Sequence[RoleObservation]
    classes: Sequence[ClassWindow] = ()


class Bounds(NamedTuple):
    """A role's replica bounds; `pinned` (the role's `replicas` field) wins over everything."""

    min: int
    max: int
    pinned: int | None = None


@dataclass(frozen=True)
class RoleState:
    """What one (variant, role) remembers between calls."""

    last_up_s: float | None = None
    last_down_s: float | None = None
    ready_since_s: float | None = None  # when the pods of the last scale-up were first all ready
    good_since_s: float | None = None  # start of the current unbroken run of good signals (down-scale history)
    load_s: float | None = None  # how long the last scale-up took to become ready (learned)
    last_signals: tuple[float, float | None, float | None] | None = None  # (time, KV pressure, worst p90/target)


@dataclass(frozen=True)
class PlannerState:
    """Carried between calls (returned in every Plan); keyed like `Plan.replicas`. Never mutated."""

    roles: Mapping[str, RoleState] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanCondition:
    """A status condition the operator merges into the fleet's conditions."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


@dataclass(frozen=True)
class PlanEvent:
    """An Event to record on the fleet (reason, message, Normal or Warning)."""

    reason: str
    message: str
    type: Literal["Normal", "Warning"] = "Normal"


@dataclass(frozen=True)
class Plan:
    """Replicas per "<variant>/<role>", conditions, events, and the state for the next call."""

    replicas: dict[str, int]
    conditions: list[PlanCondition]
    events: list[PlanEvent]
    state: PlannerState


@dataclass(frozen=True)
class Tuning:
    """Thresholds the API does not expose (yet); the defaults are what the benchmark ran."""

    queue_high: float = 2.0  # waiting requests per pod that ask for more pods
    queue_low: float = 0.5  # at or below this, queueing allows a scale-down
    min_requests: int = 20  # fewer finished requests in the window: attainment is not evidence
    attainment_gain: float = 4.0  # step factor per unit of relative attainment shortfall
    max_up_factor: float = 2.0  # at most double the desired pods (or +4, whichever is more) per call
    max_queue_factor: float = 3.0  # a backlog asks for at most 3x the ready pods
    max_up_pods: int = 4
    max_down_fraction: float = 0.2  # at most 20% of the pods (at least 1) per step
    good_margin: float = 0.0  # attainment at least target + margin counts as good
    latency_high: float = 0.8  # a critical class's p90 above this fraction of its target asks for more
    latency_low: float = 0.5  # scale-down only while every p90 is below this fraction of its target
    pool_churn_high: float = 0.5
    pool_churn_low: float = 0.05
    pool_hit_high: float = 0.9  # above this hit rate more pool would not help
    stale_after_s: float | None = None  # default: 2 x intervalSeconds + 10 s
    load_s: float = 60.0  # a new pod's model load until the planner has seen one


DEFAULT_TUNING = Tuning()


def bounds_from_fleet(spec: InferenceFleetSpec) -> dict[str, Bounds]:
    """Per-role bounds from a fleet spec (the mempool has only a shard count: it is pinned at it)."""
    topo = spec.topology
    out: dict[str, Bounds] = {}
    for role in ("prefill", "decode", "engine"):
        rs = getattr(topo, role)
        if rs is not None:
            out[role] = Bounds(rs.min_replicas, rs.max_replicas, rs.replicas)
    out["mempool"] = Bounds(spec.mempool.replicas, spec.mempool.replicas, spec.mempool.replicas)
    return out


class _Want(NamedTuple):
    target: int  # recommendation (may exceed bounds)
    up_reasons: list[str]
    has_signal: bool
    good: bool  # every signal asks for less


def _class_signals(role: str, classes: Sequence[ClassWindow], tuning: Tuning) -> list[tuple[bool, float, str]]:
    """(critical, shortfall 0..1, text) for each class breaching the phase this role serves."""
    out = []
    for c in classes:
        if c.requests < tuning.min_requests:
            continue
        measures = {"prefill": [("TTFT", c.ttft_attained)], "decode": [("TPOT", c.tpot_attained)],
                    "engine": [("TTFT+TPOT", c.attained)]}.get(role, [])
        for label, got in measures:
            if got < c.target:
                out.append((c.critical, (c.target - got) / c.target,
                            f"{c.name} {label} attainment {got:.3f} < {c.target:.3f}"))
    return out


def _headroom(role: str, c: ClassWindow) -> list[tuple[str, float]]:
    """(label, p90 / target) for the phases this role serves, where both are known."""
    phases = {"prefill": ("TTFT",), "decode": ("TPOT",), "engine": ("TTFT", "TPOT")}.get(role, ())
    out = []
    for ph in phases:
        p90, target = (c.ttft_p90_ms, c.ttft_target_ms) if ph == "TTFT" else (c.tpot_p90_ms, c.tpot_target_ms)
        if p90 is not None and target:
            out.append((ph, p90 / target))
    return out


def _worst_latency(role: str, classes: Sequence[ClassWindow], tuning: Tuning) -> tuple[float, str] | None:
    """The highest p90/target over the critical classes with enough requests, as (ratio, text)."""
    worst: tuple[float, str] | None = None
    for c in classes:
        if c.requests < tuning.min_requests or not c.critical:
            continue
        for ph, ratio in _headroom(role, c):
            if worst is None or ratio > worst[0]:
                worst = (ratio, f"{c.name} {ph} p90 at {100 * ratio:.0f}% of its target")
    return worst


def _classes_good(role: str, classes: Sequence[ClassWindow], tuning: Tuning) -> bool:
    for c in classes:
        if c.requests < tuning.min_requests:
            continue
        got = {"prefill": c.ttft_attained, "decode": c.tpot_attained, "engine": c.attained}.get(role)
        if got is not None and got < c.target + tuning.good_margin:
            return False
        if any(ratio > tuning.latency_low for _, ratio in _headroom(role, c)):
            return False
    return True


class _Trend(NamedTuple):
    """Rising signals projected over the time new pods need: (load time + interval) x slope."""

    horizon_s: float
    kv_per_s: float = 0.0
    latency_per_s: float = 0.0


def _want(o: RoleObservation, policy: Autoscaling, classes: Sequence[ClassWindow], settled: bool,
          tuning: Tuning, trend: _Trend | None = None) -> _Want:
    """The replica count this observation asks for, from the ready pods (pending ones count as bought)."""
    trend = trend or _Trend(0.0)
    base = max(o.ready, 1)
    cur = o.replicas
    ups: list[tuple[int, str]] = []
    downs: list[int] = []
    has_signal = False
    neutral = False
    queue_role = o.role in ("prefill", "decode", "engine")
    kv_role = o.role in ("decode", "engine")

    if queue_role and o.queue_depth is not None:
        has_signal = True
        if o.queue_depth > tuning.queue_high:
            ups.append((math.ceil(base * min(o.queue_depth / tuning.queue_high, tuning.max_queue_factor)),
                        f"queue {o.queue_depth:.1f}/pod > {tuning.queue_high:g}"))
        elif o.queue_depth > tuning.queue_low:
            neutral = True
    if kv_role and o.kv_pressure is not None:
        has_signal = True
        mid = (policy.kv_pressure_low + policy.kv_pressure_high) / 2
        ahead = o.kv_pressure + max(0.0, trend.kv_per_s) * trend.horizon_s
        if o.kv_pressure > policy.kv_pressure_high:
            ups.append((math.ceil(base * o.kv_pressure / mid),
                        f"KV pressure {o.kv_pressure:.2f} > {policy.kv_pressure_high:g}"))
        elif ahead > policy.kv_pressure_high:
            ups.append((math.ceil(base * ahead / mid), f"KV pressure {o.kv_pressure:.2f} rising to {ahead:.2f} "
                                                       f"within {trend.horizon_s:.0f}s"))
        elif o.kv_pressure < policy.kv_pressure_low:
            downs.append(math.ceil(base * o.kv_pressure / mid))
        else:
            neutral = True
    if o.role == "mempool" and o.pool_churn is not None:
        has_signal = True
        hit = o.pool_hit_rate if o.pool_hit_rate is not None else 0.0
        if o.pool_churn > tuning.pool_churn_high and hit < tuning.pool_hit_high:
            ups.append((base + 1, f"pool churn {o.pool_churn:.2f} > {tuning.pool_churn_high:g} "
                                  f"at hit rate {hit:.2f}"))
        elif o.pool_churn < tuning.pool_churn_low:
            downs.append(cur - 1)
        else:
            neutral = True

    if o.role != "mempool":
        counted = [c for c in classes if c.requests >= tuning.min_requests]
        if counted:
            has_signal = True
        breaches = _class_signals(o.role, classes, tuning)
        worst = _worst_latency(o.role, classes, tuning)
        latency = None
        if worst is not None:
            ahead = worst[0] + max(0.0, trend.latency_per_s) * trend.horizon_s
            if worst[0] > tuning.latency_high:
                latency = worst
            elif ahead > tuning.latency_high:
                latency = (ahead, f"{worst[1]}, rising to {100 * ahead:.0f}% within {trend.horizon_s:.0f}s")
        if latency is not None and not breaches:
            mid_lat = (tuning.latency_low + tuning.latency_high) / 2
            ups.append((max(base + 1, math.ceil(base * latency[0] / mid_lat)), latency[1]))
        if breaches:
            critical = [b for b in breaches if b[0]]
            if critical:
                crit = max(critical, key=lambda b: b[1])
                ups.append((math.ceil(base * (1 + tuning.attainment_gain * crit[1])), crit[2]))
            else:
                ups.append((base + 1, breaches[0][2] + " (sheddable)"))
        elif latency is not None or not _classes_good(o.role, classes, tuning):
            neutral = True

    # Pods still loading count as bought; once they serve, the window still partly describes the
    # fleet before them: a further step needs signals that are not falling.
    falling = trend.kv_per_s < 0 and trend.latency_per_s <= 0
    if ups and (o.ready < cur or (not settled and falling)):
        return _Want(cur, [], True, False)
    if ups:
        limit = max(math.ceil(cur * tuning.max_up_factor), cur + tuning.max_up_pods)
        target = max(min(max(n for n, _ in ups), limit), base + 1)
        return _Want(max(target, cur), [t for _, t in ups], True, False)
    if neutral or not has_signal:
        return _Want(cur, [], has_signal, False)
    # Every signal is good: what KV pressure says, else one pod less (the caller limits the step).
    return _Want(max(min(downs, default=cur - 1), 0), [], True, True)


def _role_stale_limit(policy: Autoscaling, tuning: Tuning) -> float:
    return tuning.stale_after_s if tuning.stale_after_s is not None else 2.0 * policy.interval_seconds + 10


def plan(policy: Autoscaling, bounds: Mapping[str, Bounds], obs: Observation, state: PlannerState,
         tuning: Tuning = DEFAULT_TUNING) -> Plan:
    """Decide replicas for every observed role. `bounds` is keyed by "<variant>/<role>" or "<role>"."""
    conditions: list[PlanCondition] = []
    events: list[PlanEvent] = []
    new_states: dict[str, RoleState] = dict(state.roles)
    replicas: dict[str, int] = {}
    reasons: dict[str, str] = {}

    stale_limit = _role_stale_limit(policy, tuning)
    if obs.data_age_s is None:
        stale = "NoData", "no spans received from the fleet yet: holding replicas"
    elif obs.data_age_s > stale_limit:
        stale = "Stale", f"newest span is {obs.data_age_s:.0f}s old (> {stale_limit:.0f}s): holding replicas"
    else:
        stale = None
    if stale:
        conditions.append(PlanCondition("TelemetryStale", "True", stale[0], stale[1]))
    else:
        conditions.append(PlanCondition("TelemetryStale", "False", "Fresh",
                                        f"newest span {obs.data_age_s:.0f}s old"))

    limited: list[str] = []
    silent: list[str] = []
    stab = float(policy.scale_down_stabilization_seconds)
    for o in obs.roles:
        b = bounds.get(o.key) or bounds.get(o.role)
        if b is None:
            replicas[o.key] = o.replicas
            silent.append(f"{o.key} (no bounds)")
            continue
        rs = new_states.get(o.key, RoleState())
        if rs.last_up_s is not None and rs.ready_since_s is None and o.ready >= o.replicas:
            rs = replace(rs, ready_since_s=obs.now, load_s=obs.now - rs.last_up_s)
        if b.pinned is not None:
            replicas[o.key] = b.pinned
            new_states[o.key] = replace(rs, good_since_s=None)
            continue
        if stale or not policy.enabled:
            replicas[o.key] = max(b.min, min(b.max, o.replicas))
            new_states[o.key] = replace(rs, good_since_s=None)
            continue
        settled = rs.last_up_s is None or (rs.ready_since_s is not None
                                           and obs.now - rs.ready_since_s >= obs.window_s)
        worst = _worst_latency(o.role, obs.classes, tuning)
        signals = (obs.now, o.kv_pressure, worst[0] if worst else None)
        trend = _Trend((rs.load_s if rs.load_s is not None else tuning.load_s) + policy.interval_seconds)
        if rs.last_signals is not None and obs.now > rs.last_signals[0]:
            dt = obs.now - rs.last_signals[0]
            slope = [(new - old) / dt if new is not None and old is not None else 0.0
                     for new, old in zip(signals[1:], rs.last_signals[1:], strict=True)]
            trend = trend._replace(kv_per_s=slope[0], latency_per_s=slope[1])
        rs = replace(rs, last_signals=signals)
        want = _want(o, policy, obs.classes, settled, tuning, trend)
        if not want.has_signal:
            silent.append(o.key)
        good_since = (rs.good_since_s if rs.good_since_s is not None else obs.now) if want.good else None
        new = o.replicas
        if want.target > o.replicas:
            new = want.target
            reasons[o.key] = "; ".join(want.up_reasons)
        elif want.good and want.target < o.replicas:
            assert good_since is not None
            anchor = good_since if rs.last_up_s is None else max(good_since, rs.last_up_s)
            waited = obs.now - anchor >= stab
            paced = rs.last_down_s is None or obs.now - rs.last_down_s >= obs.window_s
            if waited and paced:
                step = max(1, math.floor(o.replicas * tuning.max_down_fraction))
                new = max(want.target, o.replicas - step)
                reasons[o.key] = f"every signal good for {obs.now - good_since:.0f}s (>= {stab:.0f}s)"
        clamped = max(b.min, min(b.max, new))
        if new > b.max and new > o.replicas:
            limited.append(f"{o.key} wants {new} > maxReplicas {b.max}")
        replicas[o.key] = clamped
        new_states[o.key] = replace(rs, good_since_s=good_since)

    _ratio_band(policy, bounds, obs.roles, replicas, reasons, limited)

    for o in obs.roles:
        new, old = replicas[o.key], o.replicas
        rs = new_states.get(o.key, RoleState())
        if new > old:
            events.append(PlanEvent("ScaledUp", f"{o.key} {old} -> {new}: {reasons.get(o.key, 'bounds')}"))
            new_states[o.key] = replace(rs, last_up_s=obs.now, ready_since_s=None)
        elif new < old:
            events.append(PlanEvent("ScaledDown", f"{o.key} {old} -> {new}: {reasons.get(o.key, 'bounds')}"))
            new_states[o.key] = replace(rs, last_down_s=obs.now)

    changed = [e.message for e in events]
    if stale:
        conditions.append(PlanCondition("Scaling", "False", "TelemetryStale", stale[1]))
    elif not policy.enabled:
        conditions.append(PlanCondition("Scaling", "False", "Disabled", "autoscaling.enabled is false"))
    elif changed:
        conditions.append(PlanCondition("Scaling", "True", "Scaled", "; ".join(changed)))
    else:
        conditions.append(PlanCondition("Scaling", "True", "Stable", "every role within its signals"))
    if limited:
        conditions.append(PlanCondition("ScalingLimited", "True", "AtBounds", "; ".join(limited)))
        events.append(PlanEvent("ScalingLimited", "; ".join(limited), "Warning"))
    else:
        conditions.append(PlanCondition("ScalingLimited", "False", "WithinBounds", "no role is held by a bound"))
    if silent and not stale:
        conditions.append(PlanCondition("TelemetryIncomplete", "True", "MissingSignals",
                                        "holding roles without signals: " + ", ".join(silent)))
    return Plan(replicas, conditions, events, PlannerState(new_states))


def _ratio_band(policy: Autoscaling, bounds: Mapping[str, Bounds], roles: Sequence[RoleObservation],
                replicas: dict[str, int], reasons: dict[str, str], limited: list[str]) -> None:
    """Keep min <= prefill/decode <= max per variant: raise the lagging role first, cut only at its bound."""
    lo, hi = policy.ratio.min_prefill_per_decode, policy.ratio.max_prefill_per_decode
    variants = {o.variant for o in roles if o.role == "prefill"} & {o.variant for o in roles if o.role == "decode"}
    for v in sorted(variants):
        pk, dk = f"{v}/prefill", f"{v}/decode"
        pb, db = bounds.get(pk) or bounds.get("prefill"), bounds.get(dk) or bounds.get("decode")
        if pb is None or db is None:
            continue
        p, d = replicas[pk], replicas[dk]
        p_free, d_free = pb.pinned is None, db.pinned is None
        if d > 0 and p > hi * d:  # too much prefill: more decode, else less prefill
            if d_free:
                d = min(db.max, max(d, math.ceil(p / hi)))
            if p > hi * d and p_free:
                p = max(pb.min, math.floor(hi * d))
        elif p < lo * d:  # too little prefill: more prefill, else less decode
            if p_free:
                p = min(pb.max, max(p, math.ceil(lo * d)))
            if p < lo * d and d_free:
                d = max(db.min, math.floor(p / lo))
        for key, new in ((pk, p), (dk, d)):
            if new != replicas[key]:
                reasons[key] = f"prefill:decode ratio band {lo:g}..{hi:g}"
                replicas[key] = new
        if (d > 0 and p > hi * d) or p < lo * d:
            limited.append(f"{v}: prefill {p} / decode {d} outside ratio band {lo:g}..{hi:g} (bounds or pins)")
