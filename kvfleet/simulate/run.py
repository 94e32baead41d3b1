"""Replay a trace against a simulated fleet under one controller; measure what the issue asks for."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from kvfleet.operator.planner import ClassWindow

from .controllers import Controller
from .fleet import Fleet, Job
from .profiles import Profile
from .trace import Request, prefix_lengths


@dataclass
class Result:
    controller: str
    attainment: dict[str, float]
    requests: dict[str, int]
    gpu_hours: float
    breach_to_scale_up_s: list[float]  # one per breach episode of the critical class (inf: never scaled up)
    scale_events: int
    peak_pods: int
    mean_pods: float
    rejected: int
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, desired, ready) per decision

    @property
    def breach_summary(self) -> str:
        if not self.breach_to_scale_up_s:
            return "no breach"
        xs = self.breach_to_scale_up_s
        def fmt(x: float) -> str:
            return "never" if math.isinf(x) else f"{x:.0f}"

        return f"{fmt(statistics.median(xs))} / {fmt(max(xs))} ({len(xs)})"


class _Bucket:
    __slots__ = ("n", "ttft", "tpot", "both", "ttft_ms", "tpot_ms")

    def __init__(self) -> None:
        self.n = self.ttft = self.tpot = self.both = 0
        self.ttft_ms: list[float] = []
        self.tpot_ms: list[float] = []


def _p90(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs.sort()
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


class Simulation:
    """Drives a Fleet and a Controller; implements the controller's View from per-second buckets."""

    def __init__(self, requests: list[Request], profile: Profile, controller: Controller, *, seed: int,
                 initial: int, tick_s: float, drain_s: float, tail_s: float) -> None:
        self.requests, self.p, self.ctrl = requests, profile, controller
        self.variants = sorted({r.variant for r in requests})
        unknown = sorted({r.slo_class for r in requests} - set(profile.classes))
        if unknown:
            raise ValueError(f"trace uses SLO classes {unknown} that profile {profile.name} does not define "
                             f"(it has {sorted(profile.classes)})")
        self.fleet = Fleet(profile, prefix_lengths(requests), seed=seed, tick_s=tick_s, drain_s=drain_s)
        self.fleet.on_finish.append(self._finished)
        for v in self.variants:
            self.fleet.scale(v, initial, -profile.startup_s)  # warm at t=0
        self.tick_s, self.tail_s = tick_s, tail_s
        self.now = 0.0
        self.classes: dict[str, dict[int, _Bucket]] = {c: defaultdict(_Bucket) for c in profile.classes}
        self.samples: dict[str, dict[int, list[float]]] = {v: defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
                                                           for v in self.variants}
        self.last_finish: float | None = None

    # -- the View -------------------------------------------------------------------------------
    def desired(self, variant: str) -> int:
        return self.fleet.desired(variant)

    def ready(self, variant: str) -> int:
        return len(self.fleet.ready_pods(variant))

    def _window(self, variant: str, window_s: float, idx: int) -> float | None:
        s = self.samples[variant]
        end = int(self.now)
        num = sum(s[t][idx] for t in range(end - int(window_s), end) if t in s)
        den = sum(s[t][3] for t in range(end - int(window_s), end) if t in s)
        return num / den if den else None

    def kv_pressure(self, variant: str, window_s: float) -> float | None:
        return self._window(variant, window_s, 0)

    def queue_per_pod(self, variant: str, window_s: float) -> float | None:
        return self._window(variant, window_s, 1)

    def gpu_util(self, variant: str, window_s: float) -> float | None:
        return self._window(variant, window_s, 2)

    def waiting_total(self, variant: str) -> int:
        return self.fleet.queued(variant)

    def class_windows(self, window_s: float) -> list[ClassWindow]:
        out = []
        end = int(self.now)
        for name, buckets in self.classes.items():
            b = _Bucket()
            for t in range(end - int(window_s), end):
                x = buckets.get(t)
                if x is not None:
                    b.n += x.n
                    b.ttft += x.ttft
                    b.tpot += x.tpot
                    b.both += x.both
                    b.ttft_ms += x.ttft_ms
                    b.tpot_ms += x.tpot_ms
            slo = self.p.classes[name]
            if b.n:
                out.append(ClassWindow(name, b.n, b.ttft / b.n, b.tpot / b.n, b.both / b.n, slo.target,
                                       slo.critical, _p90(b.ttft_ms), _p90(b.tpot_ms), slo.ttft_ms, slo.tpot_ms))
        return out

    def data_age_s(self) -> float | None:
        return None if self.last_finish is None else self.now - self.last_finish

    # -- bookkeeping ----------------------------------------------------------------------------
    @staticmethod
    def latencies_ms(job: Job) -> tuple[float, float] | None:
        if job.missed or job.first_token_s is None or job.finish_s is None:
            return None
        ttft = job.first_token_s - job.req.arrival_s
        tpot = (job.finish_s - job.first_token_s) / (job.req.output_tokens - 1) if job.req.output_tokens > 1 else 0
        return 1000 * ttft, 1000 * tpot

    def ok(self, job: Job) -> tuple[bool, bool]:
        lat = self.latencies_ms(job)
        if lat is None:
            return False, False
        slo = self.p.classes[job.req.slo_class]
        return lat[0] <= slo.ttft_ms, lat[1] <= slo.tpot_ms

    def _finished(self, job: Job, now: float) -> None:
        a, b = self.ok(job)
        x = self.classes[job.req.slo_class][int(now)]
        lat = self.latencies_ms(job)
        if lat is not None:
            x.ttft_ms.append(lat[0])
            x.tpot_ms.append(lat[1])
        x.n += 1
        x.ttft += a
        x.tpot += b
        x.both += a and b
        self.last_finish = now

    def _sample(self) -> None:
        for v in self.variants:
            ready = self.fleet.ready_pods(v)
            if not ready:
                continue
            s = self.samples[v][int(self.now)]
            n = len(ready)
            s[0] += sum(p.reserved for p in ready) / self.p.kv_capacity_tokens
            s[1] += self.fleet.queued(v)
            s[2] += sum(min(1.0, p.busy_s / self.tick_s) for p in ready)
            s[3] += n
            for p in ready:
                p.busy_s = 0.0

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> Result:
        reqs = self.requests
        i, n = 0, len(reqs)
        end = reqs[-1].arrival_s + self.tail_s
        next_decision = self.ctrl.interval_s
        timeline: list[tuple[float, int, int]] = []
        ups: list[float] = []
        events = 0
        pods_sum = peak = 0
        ticks = 0
        while self.now < end and (i < n or len(self.fleet.done) < n):
            while i < n and reqs[i].arrival_s < self.now + self.tick_s / 2:
                r = reqs[i]
                self.fleet.arrive(r, self.p.classes[r.slo_class].critical, self.now)
                i += 1
            self.fleet.tick(self.now)
            self.now += self.tick_s
            self._sample()
            live = sum(len(p) for p in self.fleet.pods.values())
            pods_sum += live
            peak = max(peak, live)
            ticks += 1
            if self.now >= next_decision:
                next_decision += self.ctrl.interval_s
                want = self.ctrl.decide(self, self.variants)
                for v, k in want.items():
                    cur = self.fleet.desired(v)
                    if k != cur:
                        events += 1
                        if k > cur:
                            ups.append(self.now)
                        self.fleet.scale(v, k, self.now)
                    timeline.append((self.now, k, self.ready(v)))
        # requests still in flight (or never routed) when the run ends count as missed
        attained: dict[str, int] = defaultdict(int)
        for j in self.fleet.done:
            attained[j.req.slo_class] += all(self.ok(j))
        totals: dict[str, int] = defaultdict(int)
        for r in reqs:
            totals[r.slo_class] += 1
        att = {c: attained[c] / totals[c] for c in totals}
        return Result(
            controller=self.ctrl.name,
            attainment=att,
            requests=dict(totals),
            gpu_hours=self.fleet.gpu_s / 3600,
            breach_to_scale_up_s=self._breaches(ups),
            scale_events=events,
            peak_pods=peak,
            mean_pods=pods_sum / max(ticks, 1),
            rejected=sum(1 for j in self.fleet.done if j.missed),
            timeline=timeline,
        )

    def _breaches(self, ups: list[float]) -> list[float]:
        """Critical classes: when the 60 s attainment first drops below target, how long to a scale-up."""
        out = []
        for name, slo in self.p.classes.items():
            if not slo.critical:
                continue
            buckets = self.classes[name]
            if not buckets:
                continue
            last = max(buckets)
            n = ok = 0
            inside = False
            for t in range(0, last + 1):
                x = buckets.get(t)
                if x is not None:
                    n, ok = n + x.n, ok + x.both
                y = buckets.get(t - 60)
                if y is not None:
                    n, ok = n - y.n, ok - y.both
                breached = n >= 20 and ok / n < slo.target
                if breached and not inside:
                    # an up decided within one interval before counts: the controller was already on it
                    after = [u for u in ups if u >= t - self.ctrl.interval_s]
                    out.append(max(0.0, after[0] - t) if after else math.inf)
                inside = breached
        return out
