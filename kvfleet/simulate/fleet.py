"""A discrete-event fleet: engine pods stepping batches, a router, pods that load and drain.

Time advances in ticks of `tick_s`; inside a tick each pod runs whole engine
steps (a step that crosses the tick's end is carried into the next one), jumping
over runs of identical steps to the next event (a prefill finishing, a sequence
finishing, the tick's end), so the cost is per event, not per token. A pod:

- `starting` for the profile's model-load time (it costs GPU time, serves nothing);
- `ready`: admits the highest-priority waiting request when its KV reservation
  (prompt + output tokens) and `max_num_seqs` allow -- a critical request that
  does not fit preempts the newest sheddable one, which goes back to the router
  and starts over (priority: "scheduled first, preempted last") -- prefills in chunks of
  `max_num_batched_tokens` minus the running sequences, decodes one token per
  running sequence per step; a prefix it has prefilled before is not recomputed;
- `draining` after a scale-down: takes nothing new, its waiting requests go back
  to the router, it finishes what runs within `drain_s` (the rest is cut and
  counts as missed), then it is gone.

The router sends a request to the least loaded of two random ready pods (or the
pod that last served its prefix, unless that one is much busier) while that pod
has fewer than `POD_QUEUE` requests waiting; otherwise, like kvfleet's router,
it holds the request (critical classes first) until a pod has room, and it
rejects sheddable requests while more than `max_queued` requests wait.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .profiles import Profile
from .trace import Request

POD_QUEUE = 4  # requests a pod holds beyond what it runs; the rest wait at the router


@dataclass(slots=True)
class Job:
    req: Request
    critical: bool
    prefill_left: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    missed: bool = False  # rejected or cut by a drain


@dataclass(eq=False)
class Pod:
    id: int
    variant: str
    ready_at: float
    state: str = "starting"  # starting | ready | draining
    drain_deadline: float = 0.0
    waiting: list[tuple[int, int, Job]] = field(default_factory=list)  # heap of (not critical, seq, job)
    prefilling: deque[Job] = field(default_factory=deque)
    running: list[tuple[float, int, float, Job]] = field(default_factory=list)  # (finish at g, seq, g at join, job)
    g: float = 0.0  # tokens decoded by every running sequence since the pod started
    ctx_base: float = 0.0  # sum over running of (prompt + 1 - g at join): context = ctx_base + n * g
    reserved: int = 0
    prefixes: dict[str, None] = field(default_factory=dict)  # LRU of prefilled shared prefixes
    carry: float = 0.0  # step time already spent into the next tick
    busy_s: float = 0.0

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    def context_tokens(self) -> float:
        return self.ctx_base + len(self.running) * self.g


class Fleet:
    def __init__(self, profile: Profile, prefix_len: dict[str, int], *, seed: int, tick_s: float,
                 drain_s: float, max_queued: int = 256) -> None:
        self.p = profile
        self.prefix_len = prefix_len
        self.rng = random.Random(seed)
        self.tick_s = tick_s
        self.drain_s = drain_s
        self.max_queued = max_queued
        self.pods: dict[str, list[Pod]] = {}
        self.pending: dict[str, list[tuple[int, int, Job]]] = {}  # at the router: heap (not critical, seq, job)
        self.prefix_home: dict[str, Pod] = {}
        self.done: list[Job] = []
        self._ids = 0
        self._seq = 0
        self.gpu_s = 0.0
        self.preemptions = 0
        self.on_finish: list[Callable[[Job, float], None]] = []

    # -- replicas -------------------------------------------------------------------------------
    def ready_pods(self, variant: str) -> list[Pod]:
        return [p for p in self.pods.get(variant, ()) if p.state == "ready"]

    def desired(self, variant: str) -> int:
        return sum(1 for p in self.pods.get(variant, ()) if p.state != "draining")

    def scale(self, variant: str, n: int, now: float) -> None:
        """Set the desired replicas: start pods, or cancel starting ones then drain the least loaded."""
        pods = self.pods.setdefault(variant, [])
        live = [p for p in pods if p.state != "draining"]
        for _ in range(n - len(live)):
            self._ids += 1
            pods.append(Pod(self._ids, variant, ready_at=now + self.p.startup_s))
        if n < len(live):
            victims = sorted(live, key=lambda p: (p.state != "starting", p.load))[: len(live) - n]
            for pod in victims:
                if pod.state == "starting":
                    pods.remove(pod)
                    continue
                pod.state, pod.drain_deadline = "draining", now + self.drain_s
                while pod.waiting:
                    self._route(heapq.heappop(pod.waiting)[2], now)

    # -- requests -------------------------------------------------------------------------------
    def arrive(self, req: Request, critical: bool, now: float) -> None:
        job = Job(req, critical)
        if not critical and self.queued(req.variant) > self.max_queued:
            job.missed = True
            self._finish(job, now)
            return
        self._route(job, now)

    def queued(self, variant: str) -> int:
        return len(self.pending.get(variant, ())) + sum(len(p.waiting) for p in self.ready_pods(variant))

    def _route(self, job: Job, now: float) -> None:
        self._seq += 1
        item = (0 if job.critical else 1, self._seq, job)
        ready = self.ready_pods(job.req.variant)
        if ready:
            a, b = self.rng.choice(ready), self.rng.choice(ready)
            pod = a if a.load <= b.load else b
            home = self.prefix_home.get(job.req.shared_prefix or "")
            if home is not None and home.state == "ready" and home.load <= 1.5 * pod.load + 4:
                pod = home
            if len(pod.waiting) < POD_QUEUE:
                heapq.heappush(pod.waiting, item)
                return
        heapq.heappush(self.pending.setdefault(job.req.variant, []), item)

    def _finish(self, job: Job, now: float) -> None:
        job.finish_s = now
        self.done.append(job)
        for cb in self.on_finish:
            cb(job, now)

    # -- time -----------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Advance every pod from `now` to `now + tick_s`."""
        end = now + self.tick_s
        for variant, pods in self.pods.items():
            for pod in list(pods):
                self.gpu_s += self.tick_s
                if pod.state == "starting":
                    if pod.ready_at <= end:
                        pod.state = "ready"
                    continue
                pending = self.pending.get(variant)
                while pending and pod.state == "ready" and len(pod.waiting) < POD_QUEUE:
                    heapq.heappush(pod.waiting, heapq.heappop(pending))
                self._run(pod, now, end)
                if pod.state == "draining" and (pod.load == 0 or end >= pod.drain_deadline):
                    for *_, job in pod.running:
                        job.missed = True
                        self._finish(job, end)
                    for job in pod.prefilling:
                        job.missed = True
                        self._finish(job, end)
                    pods.remove(pod)

    def _admit(self, pod: Pod) -> None:
        p = self.p
        budget = p.max_num_batched_tokens - len(pod.running)
        queued = sum(j.prefill_left for j in pod.prefilling)
        while pod.waiting and queued < budget:
            job = pod.waiting[0][2]
            need = job.req.prompt_tokens + job.req.output_tokens
            if pod.reserved + need > p.kv_capacity_tokens or len(pod.running) + len(pod.prefilling) >= p.max_num_seqs:
                if not (job.critical and self._preempt(pod)):
                    break
                continue
            heapq.heappop(pod.waiting)
            pod.reserved += need
            hit = job.req.shared_prefix is not None and job.req.shared_prefix in pod.prefixes
            job.prefill_left = job.req.prompt_tokens - (self.prefix_len.get(job.req.shared_prefix or "", 0)
                                                         if hit else 0)
            job.prefill_left = max(job.prefill_left, 1)
            pod.prefilling.append(job)
            queued += job.prefill_left

    def _preempt(self, pod: Pod) -> bool:
        """Send the newest sheddable sequence back to the router; False when there is none."""
        victims = [e for e in pod.running if not e[3].critical]
        if victims:
            entry = max(victims, key=lambda e: e[2])
            pod.running.remove(entry)
            heapq.heapify(pod.running)
            job = entry[3]
            pod.ctx_base -= job.req.prompt_tokens + 1 - entry[2]
        else:
            queued = [j for j in pod.prefilling if not j.critical]
            if not queued:
                return False
            job = queued[-1]
            pod.prefilling.remove(job)
        pod.reserved -= job.req.prompt_tokens + job.req.output_tokens
        job.first_token_s = None
        self.preemptions += 1
        self._seq += 1
        heapq.heappush(self.pending.setdefault(pod.variant, []), (1, self._seq, job))
        return True

    def _run(self, pod: Pod, now: float, end: float) -> None:
        p = self.p
        t = now + pod.carry
        idle_s = 0.0
        while t < end:
            if pod.state == "ready":
                self._admit(pod)
            n_run = len(pod.running)
            budget = max(0, p.max_num_batched_tokens - n_run)
            pf_total = sum(j.prefill_left for j in pod.prefilling)
            chunk = min(budget, pf_total)
            if n_run == 0 and chunk == 0:
                idle_s = end - t
                t = end
                break
            step = p.step_s(n_run, pod.context_tokens(), chunk)
            # How many identical steps until something changes?
            k = max(1, int((end - t) / step))
            if pod.running:
                k = min(k, max(1, int(pod.running[0][0] - pod.g)))
            if pod.prefilling:
                k = min(k, max(1, pod.prefilling[0].prefill_left // max(chunk, 1)))
            t += k * step
            if n_run:
                pod.g += k
                while pod.running and pod.running[0][0] <= pod.g + 1e-9:
                    _, _, g_join, job = heapq.heappop(pod.running)
                    pod.reserved -= job.req.prompt_tokens + job.req.output_tokens
                    pod.ctx_base -= job.req.prompt_tokens + 1 - g_join
                    self._finish(job, t)
            left = chunk * k
            while left > 0 and pod.prefilling:
                job = pod.prefilling[0]
                used = min(left, job.prefill_left)
                job.prefill_left -= used
                left -= used
                if job.prefill_left == 0:
                    pod.prefilling.popleft()
                    self._first_token(pod, job, t)
        pod.carry = max(0.0, t - end)
        pod.busy_s += self.tick_s - idle_s  # a step longer than a tick keeps the GPU busy through the next ones

    def _first_token(self, pod: Pod, job: Job, t: float) -> None:
        job.first_token_s = t
        if job.req.shared_prefix is not None:
            pod.prefixes.pop(job.req.shared_prefix, None)
            pod.prefixes[job.req.shared_prefix] = None
            if len(pod.prefixes) > 64:
                pod.prefixes.pop(next(iter(pod.prefixes)))
            self.prefix_home[job.req.shared_prefix] = pod
        if job.req.output_tokens <= 1:
            pod.reserved -= job.req.prompt_tokens + job.req.output_tokens
            self._finish(job, t)
            return
        self._seq += 1
        # this sequence's context = prompt + 1 + (g - g_join), i.e. ctx_base gains prompt + 1 - g_join
        pod.ctx_base += job.req.prompt_tokens + 1 - pod.g
        heapq.heappush(pod.running, (pod.g + job.req.output_tokens - 1, self._seq, pod.g, job))

    # -- what the controllers read --------------------------------------------------------------
    def kv_pressure(self, variant: str) -> float | None:
        ready = self.ready_pods(variant)
        if not ready:
            return None
        return sum(p.reserved for p in ready) / (len(ready) * self.p.kv_capacity_tokens)

    def waiting_per_pod(self, variant: str) -> float | None:
        ready = self.ready_pods(variant)
        if not ready:
            return None
        return self.queued(variant) / len(ready)
