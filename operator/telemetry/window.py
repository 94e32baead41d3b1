"""Sliding-window aggregates of what the dataplane exports, per fleet (pure, bounded memory).

Inputs are OTLP metric points already flattened by the receiver: cumulative counters
(`kvfleet.requests`, `kvfleet.tokens`), cumulative histograms (`kvfleet.ttft`, `kvfleet.tpot`) and
gauges (`kvfleet.kv.utilisation`, `kvfleet.queue.depth`), each with the exporting pod's identity
(namespace, fleet, role, variant, pod) and its attributes. Cumulative series are differenced over the
window, so a request counts exactly once however often it is exported, and spans being sampled
never changes a count. A series is identified by its pod and its start time, so a restarted pod is a
new series rather than a counter reset.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field, replace

Attrs = tuple[tuple[str, str], ...]
GAUGES = ("kvfleet.kv.utilisation", "kvfleet.queue.depth", "kvfleet.router.queued", "kvfleet.pool.used_bytes")
POOL_COUNTERS = ("kvfleet.pool.lookups", "kvfleet.pool.hits", "kvfleet.pool.evictions", "kvfleet.pool.insertions")
ENTRY_ROLES = ("router", "engine", "serve")  # where a request enters the fleet: counted once, there


@dataclass(frozen=True)
class Source:
    """Who exported a point (from the OTLP resource)."""

    namespace: str
    fleet: str
    role: str
    variant: str
    pod: str


@dataclass(frozen=True)
class ClassWindow:
    """One SLO class over the window (finished requests; percentiles from the histograms)."""

    name: str
    requests: int
    attained: int  # met both targets
    ttft_p90_ms: float | None
    tpot_p90_ms: float | None
    ttft_attained: int = 0  # met the TTFT target
    tpot_attained: int = 0  # met the TPOT target

    @property
    def attainment(self) -> float | None:
        return self.attained / self.requests if self.requests else None


@dataclass(frozen=True)
class RoleWindow:
    """One role of one variant: its pods' latest gauges."""

    role: str
    variant: str
    pods: int
    kv_pressure: float | None  # mean KV utilisation over its pods
    queue_depth: float | None  # mean waiting requests per pod
    router_queued: float | None = None  # requests waiting in the router(s) for KV room (router role)
    pool_hit_rate: float | None = None  # mempool: blocks found / blocks asked for, over the window
    pool_churn: float | None = None  # mempool: blocks evicted / blocks inserted, over the window (0 = none)
    pool_bytes: float | None = None  # mempool: bytes held, all replicas


@dataclass(frozen=True)
class FleetWindow:
    """Everything the window holds about one fleet."""

    classes: list[ClassWindow]
    roles: list[RoleWindow]
    output_tokens: int
    data_age_s: float | None  # since the newest point; None = nothing seen


@dataclass
class _Series:
    start: float
    points: deque[tuple[float, tuple[float, ...]]] = field(default_factory=deque)


class Windows:
    """All fleets' series; `fleet()` reads one fleet's window at `now`. Points older than `window_s` (the
    longest window any fleet may ask for) are forgotten."""

    def __init__(self, window_s: float = 3600.0, max_series: int = 20000) -> None:
        self.window_s = window_s
        self.max_series = max_series
        self._series: dict[tuple[Source, str, Attrs, float], _Series] = {}
        self._bounds: dict[str, tuple[float, ...]] = {}
        self._last_seen: dict[tuple[str, str], float] = {}
        self.dropped = 0  # points nobody could attribute to a fleet, or over the series bound

    # -- intake ----------------------------------------------------------------------

    def add(self, src: Source | None, metric: str, attrs: Attrs, start: float, t: float,
            values: tuple[float, ...], bounds: tuple[float, ...] = ()) -> None:
        """One point: a cumulative value (counter) or bucket counts (histogram), or a gauge (start = t)."""
        if src is None or not src.fleet or not src.namespace:
            self.dropped += 1
            return
        key = (src, metric, attrs, start)
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= self.max_series:
                self._expire(t)
                if len(self._series) >= self.max_series:
                    self.dropped += 1
                    return
            s = self._series[key] = _Series(start)
        if bounds:
            self._bounds[metric] = bounds
        s.points.append((t, values))
        while len(s.points) > 2 and s.points[1][0] <= t - self.window_s:
            s.points.popleft()  # keep one point at or before the window's start as the baseline
        self._last_seen[(src.namespace, src.fleet)] = max(t, self._last_seen.get((src.namespace, src.fleet), t))

    def _expire(self, now: float) -> None:
        old = [k for k, s in self._series.items() if s.points and s.points[-1][0] < now - 2 * self.window_s]
        for k in old:
            del self._series[k]

    # -- reads --------------------------------------------------------------------------

    @staticmethod
    def _delta(s: _Series, now: float, window_s: float) -> tuple[float, ...] | None:
        if not s.points or s.points[-1][0] < now - window_s:
            return None  # nothing new in the window
        last = s.points[-1][1]
        base = next((v for t, v in reversed(s.points) if t <= now - window_s), None)
        if base is None:
            base = (0.0,) * len(last) if s.start >= now - window_s else s.points[0][1]
        return tuple(a - b for a, b in zip(last, base, strict=True))

    def fleet(self, namespace: str, fleet: str, now: float, window_s: float = 60.0) -> FleetWindow:
        reqs: dict[str, list[int]] = {}
        hists: dict[tuple[str, str], list[float]] = {}
        gauges: dict[tuple[str, str, str], dict[str, float]] = {}
        out_tokens = 0
        pool: dict[str, float] = {}
        for (src, metric, attrs, _), s in self._series.items():
            if (src.namespace, src.fleet) != (namespace, fleet):
                continue
            a = dict(attrs)
            if metric in GAUGES:
                if s.points and s.points[-1][0] >= now - window_s:
                    gauges.setdefault((src.role, src.variant, metric), {})[src.pod] = s.points[-1][1][0]
                continue
            d = self._delta(s, now, window_s)
            if d is None:
                continue
            klass = a.get("kvfleet.slo_class", "")
            if metric == "kvfleet.requests" and a.get("kvfleet.role") in ENTRY_ROLES:
                r = reqs.setdefault(klass, [0, 0, 0, 0])
                n = int(d[0])
                r[0] += n
                for i, flag in enumerate(("kvfleet.attained", "kvfleet.ttft_ok", "kvfleet.tpot_ok"), start=1):
                    r[i] += n if a.get(flag) == "true" else 0
            elif metric == "kvfleet.tokens" and a.get("gen_ai.token.type") == "output" \
                    and a.get("kvfleet.role") in ENTRY_ROLES:
                out_tokens += int(d[0])
            elif metric in POOL_COUNTERS:
                pool[metric] = pool.get(metric, 0.0) + d[0]
            elif metric in ("kvfleet.ttft", "kvfleet.tpot"):
                acc = hists.setdefault((klass, metric), [0.0] * len(d))
                for i, v in enumerate(d):
                    acc[i] += v
        classes = [ClassWindow(k, n, ok, _p90(hists.get((k, "kvfleet.ttft")), self._bounds.get("kvfleet.ttft", ())),
                               _p90(hists.get((k, "kvfleet.tpot")), self._bounds.get("kvfleet.tpot", ())), t_ok, p_ok)
                   for k, (n, ok, t_ok, p_ok) in sorted(reqs.items())]
        roles: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
        for (role, variant, metric), by_pod in gauges.items():
            roles.setdefault((role, variant), {})[metric] = by_pod
        role_windows = []
        for (role, variant), m in sorted(roles.items()):
            w = RoleWindow(role, variant, max(len(v) for v in m.values()), _mean(m.get("kvfleet.kv.utilisation")),
                           _mean(m.get("kvfleet.queue.depth")), _sum(m.get("kvfleet.router.queued")))
            if role == "mempool":
                lookups, ins = pool.get("kvfleet.pool.lookups", 0.0), pool.get("kvfleet.pool.insertions", 0.0)
                w = replace(w, pool_bytes=_sum(m.get("kvfleet.pool.used_bytes")),
                            pool_hit_rate=pool.get("kvfleet.pool.hits", 0.0) / lookups if lookups else None,
                            pool_churn=pool.get("kvfleet.pool.evictions", 0.0) / ins if ins else 0.0)
            role_windows.append(w)
        seen = self._last_seen.get((namespace, fleet))
        return FleetWindow(classes, role_windows, out_tokens, None if seen is None else max(0.0, now - seen))


def _sum(by_pod: dict[str, float] | None) -> float | None:
    return sum(by_pod.values()) if by_pod else None


def _mean(by_pod: dict[str, float] | None) -> float | None:
    return sum(by_pod.values()) / len(by_pod) if by_pod else None


def _p90(counts: list[float] | None, bounds: tuple[float, ...]) -> float | None:
    """The 90th percentile from histogram bucket counts (the bucket's upper bound; last bucket: its lower)."""
    if not counts or sum(counts) <= 0 or len(counts) != len(bounds) + 1:
        return None
    cum, target = 0.0, 0.9 * sum(counts)
    cumulative = []
    for c in counts:
        cum += c
        cumulative.append(cum)
    i = bisect.bisect_left(cumulative, target)
    return float(bounds[i]) if i < len(bounds) else float(bounds[-1])
