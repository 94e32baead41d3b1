"""The three controllers the simulator compares; each sees only what its real counterpart would.

- `kvfleet`: the operator's planner (kvfleet.operator.planner) on what the OTLP
  receiver aggregates over the window: per-class TTFT/TPOT attainment, KV
  pressure, waiting requests per pod, the age of the newest span.
- `hpa-gpu-util`: a Kubernetes HPA on GPU utilisation (DCGM_FI_DEV_GPU_UTIL: the
  share of time a kernel runs, averaged over 30 s), target 70%.
- `keda-queue`: KEDA's Prometheus scaler on waiting requests
  (vllm:num_requests_waiting summed over the fleet), AverageValue target 5 per pod.

The two baselines use HPA's algorithm (what KEDA drives too): desired =
ceil(ready x metric / target) (AverageValue: ceil(sum / target)), a 10% tolerance,
at most max(4 pods, 100%) up per period, and the default 300 s down-scale
stabilisation (the highest recommendation of the last 300 s).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from kvfleet.operator.api.fleet import Autoscaling
from kvfleet.operator.planner import Bounds, ClassWindow, Observation, PlannerState, RoleObservation, plan


class View(Protocol):
    """What the simulation exposes to a controller at a decision time."""

    now: float

    def desired(self, variant: str) -> int: ...
    def ready(self, variant: str) -> int: ...
    def kv_pressure(self, variant: str, window_s: float) -> float | None: ...
    def queue_per_pod(self, variant: str, window_s: float) -> float | None: ...
    def waiting_total(self, variant: str) -> int: ...
    def gpu_util(self, variant: str, window_s: float) -> float | None: ...
    def class_windows(self, window_s: float) -> list[ClassWindow]: ...
    def data_age_s(self) -> float | None: ...


class Controller(Protocol):
    name: str  # settable: a non-default knob shows in it
    interval_s: float

    def decide(self, view: View, variants: list[str]) -> dict[str, int]: ...


class KvfleetPlanner:
    """The operator's planner, colocated topology (one `engine` role per variant)."""

    name = "kvfleet"

    def __init__(self, policy: Autoscaling, min_r: int, max_r: int) -> None:
        self.policy = policy
        self.interval_s = float(policy.interval_seconds)
        self.bounds = {"engine": Bounds(min_r, max_r)}
        self.state = PlannerState()
        self.conditions: list[str] = []

    def decide(self, view: View, variants: list[str]) -> dict[str, int]:
        w = float(self.policy.window_seconds)
        roles = [RoleObservation("engine", v, view.desired(v), view.ready(v), kv_pressure=view.kv_pressure(v, w),
                                 queue_depth=view.queue_per_pod(v, w)) for v in variants]
        obs = Observation(now=view.now, data_age_s=view.data_age_s(), window_s=w, roles=roles,
                          classes=view.class_windows(w))
        p = plan(self.policy, self.bounds, obs, self.state)
        self.state = p.state
        self.conditions = [f"{c.type}={c.status}" for c in p.conditions if c.status == "True"]
        return {v: p.replicas[f"{v}/engine"] for v in variants}


class HPA:
    """HPA's algorithm on one metric (Utilization of a per-pod value, or AverageValue of a total)."""

    def __init__(self, name: str, metric: str, target: float, min_r: int, max_r: int, *,
                 interval_s: float = 15.0, tolerance: float = 0.1, stabilization_s: float = 300.0) -> None:
        self.name, self.metric, self.target = name, metric, target
        self.min_r, self.max_r = min_r, max_r
        self.interval_s, self.tolerance, self.stabilization_s = interval_s, tolerance, stabilization_s
        self.recs: dict[str, deque[tuple[float, int]]] = {}

    def decide(self, view: View, variants: list[str]) -> dict[str, int]:
        out = {}
        for v in variants:
            cur, ready = view.desired(v), max(view.ready(v), 1)
            if self.metric == "gpu_util":
                util = view.gpu_util(v, 30.0)
                rec = cur if util is None or abs(util / self.target - 1) <= self.tolerance \
                    else math.ceil(ready * util / self.target)
            else:  # AverageValue of waiting requests
                waiting = view.waiting_total(v)
                ratio = waiting / (self.target * ready)
                rec = cur if abs(ratio - 1) <= self.tolerance else math.ceil(waiting / self.target)
            rec = max(self.min_r, min(self.max_r, rec))
            if v not in self.recs:  # as if it had been running at the current count
                self.recs[v] = deque([(view.now, cur)])
            hist = self.recs[v]
            hist.append((view.now, rec))
            while hist and hist[0][0] < view.now - self.stabilization_s:
                hist.popleft()
            if rec > cur:
                new = min(rec, max(cur + 4, 2 * cur))
            else:
                new = min(cur, max(r for _, r in hist))
            out[v] = new
        return out


class Static:
    """A fixed fleet (what a team provisions for its peak): the reference an autoscaler must beat."""

    interval_s = 15.0

    def __init__(self, replicas: int) -> None:
        self.name = f"static ({replicas})"
        self.replicas = replicas

    def decide(self, view: View, variants: list[str]) -> dict[str, int]:
        return {v: self.replicas for v in variants}


DEFAULTS = {"kvfleet": 0.4, "hpa-gpu-util": 0.70, "keda-queue": 5.0}  # kvPressureLow, util target, waiting/pod


def make_controller(name: str, setting: float, min_r: int, max_r: int) -> Controller:
    """One controller; `setting` is its knob (see DEFAULTS); a non-default one shows in its name."""
    if name == "static":
        return Static(int(setting))
    label = name if setting == DEFAULTS[name] else f"{name} ({setting:g})"
    ctrl: Controller
    if name == "kvfleet":
        ctrl = KvfleetPlanner(Autoscaling(kv_pressure_low=setting), min_r, max_r)
    elif name == "hpa-gpu-util":
        ctrl = HPA(name, "gpu_util", setting, min_r, max_r)
    else:
        ctrl = HPA(name, "waiting", setting, min_r, max_r)
    ctrl.name = label
    return ctrl
