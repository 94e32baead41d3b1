"""One reconcile of one fleet: read, resolve, build, apply, prune, report (synchronous, idempotent).

The reconcile reads everything from the API server each time (level-triggered),
so running it twice, or after a crash half-way, converges to the same state.

Deleting a referenced ModelVariant or CachePolicy (the choice we made): the fleet
is *degraded, not torn down*. Its status gets `Degraded=True` with reason
`MissingReference` naming the missing object, a Warning Event says the same,
and nothing is applied or pruned while the reference is missing, so the last
applied children (and their ConfigMaps) keep serving. Re-creating the object, or
removing it from the fleet's spec, reconciles the fleet again by itself. No
finalizers are put on the referenced objects, so deleting them (or their
namespace) is never blocked by the operator being down.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from kvfleet.dataplane.config import ConfigError

from . import apply as writes
from .api.fleet import InferenceFleetStatus
from .autoscale import Autoscaler
from .builders import FleetInputs, OperatorSettings, desired_objects, router_endpoint
from .builders.names import LABEL_FLEET, MANAGED_BY, config_hash
from .cache import ObjectCache
from .children import ManualScale, key, manual_scales, owned_by, stale_children
from .kube import CHILD_KINDS, KVFLEET, METADATA_ONLY_KINDS, ApiError, Kube
from .planner import Plan
from .resolve import Unresolved, references, resolve
from .sharing import profile_refs
from .status import condition, fleet_status, status_changed, used_by_status, workload_state
from .telemetry.status import gpus_of, kv_by_role, telemetry_status
from .telemetry.window import Windows

log = logging.getLogger("kvfleet.operator")
REF_KINDS = ("ModelVariant", "CachePolicy", "SLOClass")
T = TypeVar("T")


def _marker(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    if obj.get("kind") in ("Deployment", "StatefulSet"):
        # status updates do not count; spec edits bump the generation, metadata edits change the digest
        return f"g{meta.get('generation')}/{config_hash(meta.get('labels') or {}, meta.get('annotations') or {})}"
    return f"rv{meta.get('resourceVersion')}"


def now() -> str:
    """RFC 3339 UTC time for condition transitions and Events."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """What one reconcile did (for logs, tests and the benchmark)."""

    applied: int = 0
    deleted: list[str] = field(default_factory=list)
    manual_scales: list[ManualScale] = field(default_factory=list)
    problem: tuple[str, str] | None = None
    status_written: bool = False
    gone: bool = False
    plan: Plan | None = None  # what the planner decided (autoscaling on)
    conditions: list[tuple[str, bool, str, str]] = field(default_factory=list)  # (type, status, reason, message)
    requeue_after: float | None = None  # reconcile again this soon (the autoscaling interval)


class RetryableError(Exception):
    """The reconcile hit an error worth retrying with backoff (status already says Degraded)."""


def _scale_message(s: ManualScale, inputs: FleetInputs) -> str:
    roles = inputs.engine_roles()
    if s.role in roles:
        spec = roles[s.role]
        if spec.replicas is not None:
            why = f"spec.topology.{s.role}.replicas pins it to {spec.replicas}"
        else:
            why = (f"kvfleet owns {s.role} replicas within spec.topology.{s.role}.minReplicas..maxReplicas "
                   f"({spec.min_replicas}..{spec.max_replicas}); set spec.topology.{s.role}.replicas to pin a count")
    else:
        why = f"spec.{s.role}.replicas sets it"
    return f"{s.kind} {s.name} was scaled to {s.observed} by {s.manager!r}; reverted to {s.desired}: {why}."


class Reconciler:
    """Reconciles fleets and the usedByFleets status of what they reference."""

    def __init__(self, kube: Kube, settings: OperatorSettings, fan_out: int = 16,
                 cache: ObjectCache | None = None, telemetry: Windows | None = None):
        """telemetry: what the OTLP receiver aggregated (status shows attainment, KV pressure, tokenomics)."""
        self.kube = kube
        self.settings = settings
        self.telemetry = telemetry
        self.autoscaler = Autoscaler()
        self.cache = cache
        self._warm: set[tuple[str, str]] = set()  # fleets whose children were listed from the API once
        # Requests of one reconcile that do not depend on each other run concurrently (latency).
        self._pool = ThreadPoolExecutor(max_workers=fan_out, thread_name_prefix="kube")
        # (namespace, fleet) -> child uid -> (digest of what we applied, the child's marker right after).
        self._applied: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
        self._refs_hint: dict[tuple[str, str], list[tuple[str, str]]] = {}

    def _unchanged(self, applied: Mapping[str, tuple[str, str]], want: Mapping[str, Any],
                   have: Mapping[str, Any] | None) -> bool:
        """Whether `have` is exactly what our last apply of `want` left (so applying again is a no-op).

        The marker is a workload's generation (any spec edit, a `kubectl scale`
        included, bumps it; status updates do not) plus a digest of its labels and
        annotations, and the resourceVersion of anything else. The cache is in
        memory only: after a restart every child is applied once more, which is
        harmless (server-side apply is idempotent).
        """
        if have is None:
            return False
        return applied.get(have["metadata"]["uid"]) == (config_hash(dict(want)), _marker(have))

    def _all(self, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
        """`fn` over `items` concurrently, results in order; the first exception is raised."""
        return list(self._pool.map(fn, items))

    # -- fleets -------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> Outcome:
        """Converge one fleet's children and status; raises RetryableError when a retry is due."""
        try:
            return self._reconcile(namespace, name)
        except Exception:
            # The API failed us part-way (an outage, a restarted API server or etcd): the watches that
            # feed the cache may have missed events meanwhile, so this fleet's next reconcile reads its
            # children and references from the API again instead of trusting the cache.
            self._warm.discard((namespace, name))
            raise

    def _reconcile(self, namespace: str, name: str) -> Outcome:
        kube, out = self.kube, Outcome()
        selector = f"{LABEL_FLEET}={name},app.kubernetes.io/managed-by={MANAGED_BY}"
        # One round trip for everything independent: the fleet (always fresh), its children (from the
        # watch cache once this fleet was listed once; else workloads in full for replicas/status/field
        # owners, config and services by metadata only) and the references the fleet named last time
        # that the cache lacks (a hint; whatever the fresh spec adds is fetched afterwards).
        hint = self._refs_hint.get((namespace, name), [])
        cache, warm = self.cache, (namespace, name) in self._warm
        if cache is not None and warm:
            hint = [r for r in hint if cache.get(r[0], namespace, r[1]) is None]
        reads: list[Callable[[], Any]] = [partial(kube.get, "InferenceFleet", namespace, name)]
        if cache is None or not warm:
            reads += [partial(kube.list, k, namespace, selector, metadata_only=k in METADATA_ONLY_KINDS)
                      for k in CHILD_KINDS]
        reads += [partial(kube.get, r[0], namespace, r[1]) for r in hint]
        results = self._all(lambda read: read(), reads)
        fleet, results = results[0], results[1:]
        if cache is None or not warm:
            lists, results = results[:len(CHILD_KINDS)], results[len(CHILD_KINDS):]
        else:
            lists = [[o for o in cache.children(namespace, name) if o["kind"] in CHILD_KINDS]]
        fetched = dict(zip(hint, results, strict=True))
        if fleet is None or fleet["metadata"].get("deletionTimestamp"):
            self._refs_hint.pop((namespace, name), None)
            self._applied.pop((namespace, name), None)
            self._warm.discard((namespace, name))
            out.gone = True  # owner references let the garbage collector remove the children
            return out
        self._warm.add((namespace, name))
        uid = fleet["metadata"]["uid"]
        refs = sorted({(r.kind, r.name) for r in references(fleet.get("spec") or {})})
        if cache is not None and warm:
            fetched.update({r: o for r in refs if r not in fetched and (o := cache.get(r[0], namespace, r[1]))})
        missing = [r for r in refs if r not in fetched]
        fetched.update(zip(missing, self._all(lambda ref: kube.get(ref[0], namespace, ref[1]), missing), strict=True))
        # the sharing profiles the variants name (ConfigMaps), fetched once the variants are known
        profiles = [r for r in profile_refs([fetched.get(r) for r in refs if r[0] == "ModelVariant"])
                    if r not in fetched]
        fetched.update(zip(profiles, self._all(lambda ref: kube.get(ref[0], namespace, ref[1]), profiles),
                           strict=True))
        self._refs_hint[(namespace, name)] = refs
        observed = [o for items in lists for o in items if owned_by(o, uid)]
        resolved = resolve(fleet, lambda kind, n: fetched.get((kind, n)), self.settings)
        workloads_seen = [o for o in observed if o["kind"] in ("Deployment", "StatefulSet")]
        endpoint = None
        error: Exception | None = None
        if isinstance(resolved, Unresolved):
            out.problem = (resolved.reason, resolved.message)
        else:
            endpoint = router_endpoint(resolved)
            resolved = self._autoscale(resolved, workloads_seen, out)
            try:
                desired = desired_objects(resolved)
            except ConfigError as exc:
                out.problem = ("InvalidConfig", f"the rendered engine config is invalid: {exc}")
            else:
                try:
                    workloads_seen = self._converge(fleet, resolved, desired, observed, out)
                except ApiError as exc:
                    out.problem = ("ApplyFailed", str(exc))
                    error = exc
        observed = self._observed(fleet, workloads_seen)
        if not isinstance(resolved, Unresolved) and resolved.kv_sharing_status:
            observed["kvSharing"] = [dict(row) for row in resolved.kv_sharing_status]
        self._write_status(fleet, out, [workload_state(w) for w in workloads_seen], endpoint, observed)
        if error is not None:
            raise RetryableError(str(error)) from error
        return out

    def _converge(self, fleet: Mapping[str, Any], inputs: FleetInputs, desired: list[dict[str, Any]],
                  observed: list[dict[str, Any]], out: Outcome) -> list[dict[str, Any]]:
        kube = self.kube
        out.manual_scales = manual_scales(desired, observed)
        # ConfigMaps first, so new pods never start before the config they mount exists.
        have = {key(o): o for o in observed}
        meta = fleet["metadata"]
        cache = self._applied.setdefault((meta["namespace"], meta["name"]), {})
        todo = [o for o in desired if not self._unchanged(cache, o, have.get(key(o)))]
        # ...and a Role before its RoleBinding: binding a Role that does not exist yet is refused (404) to
        # anyone but a cluster admin (RBAC checks that the binder holds the Role's permissions)
        first = ("ConfigMap", "ServiceAccount", "Role")
        configs = [o for o in todo if o["kind"] in first]
        rest = [o for o in todo if o["kind"] not in first]
        applied = self._all(lambda o: writes.apply(kube, o), configs)
        applied += self._all(lambda o: writes.apply(kube, o), rest)
        out.applied += len(applied)
        for want, got in zip(configs + rest, applied, strict=True):
            got.setdefault("kind", want["kind"])
            cache[got["metadata"]["uid"]] = (config_hash(want), _marker(got))
        fresh = {key(o): o for o in applied}
        stored = [fresh.get(key(o)) or have[key(o)] for o in desired]
        for s in out.manual_scales:
            log.info("reverting manual scale of %s/%s", fleet["metadata"]["namespace"], s.name)
            writes.event(kube, fleet, "ManualScaleReverted", _scale_message(s, inputs), "Warning")
        stale = stale_children(desired, observed, fleet["metadata"]["uid"])
        for obj, gone in zip(stale, self._all(lambda o: writes.delete(kube, o), stale), strict=True):
            cache.pop(obj["metadata"]["uid"], None)
            if gone:
                out.deleted.append(f"{obj['kind']}/{obj['metadata']['name']}")
        if out.deleted:
            writes.event(kube, fleet, "ChildrenRemoved", "Removed objects no longer desired: "
                         + ", ".join(out.deleted) + ".")
        return [o for o in stored if o.get("kind") in ("Deployment", "StatefulSet")]

    def _autoscale(self, inputs: FleetInputs, workloads: list[dict[str, Any]], out: Outcome) -> FleetInputs:
        """Observe -> plan: the planner's replicas replace the planned ones (pins still win in the builders)."""
        policy = inputs.fleet.spec.autoscaling
        if not policy.enabled:
            self.autoscaler.forget(inputs.namespace, inputs.name)
            return inputs
        if self.telemetry is None:
            out.conditions.append(("Autoscaling", False, "NoReceiver", "the operator runs without its OTLP "
                                   "receiver (--otlp-listen ''): replicas stay where they are"))
            return inputs
        now = time.time()
        window_s = float(policy.window_seconds)
        window = self.telemetry.fleet(inputs.namespace, inputs.name, now, window_s)
        p = self.autoscaler.step(inputs, window, [workload_state(w) for w in workloads], now, window_s)
        out.plan = p
        out.requeue_after = float(policy.interval_seconds)
        out.conditions += [(c.type, c.status == "True", c.reason, c.message) for c in p.conditions]
        return replace(inputs, planned={**inputs.planned, **p.replicas})

    def _observed(self, fleet: Mapping[str, Any], workloads: list[dict[str, Any]]) -> dict[str, Any]:
        """Status fields from the fleet's telemetry window ({} without a receiver)."""
        if self.telemetry is None:
            return {}
        spec = fleet.get("spec") or {}
        window_s = float((spec.get("autoscaling") or {}).get("windowSeconds", 60))
        meta = fleet["metadata"]
        w = self.telemetry.fleet(meta["namespace"], meta["name"], time.time(), window_s)
        out = telemetry_status(w, window_s, spec.get("sloClasses") or [], gpus_of(workloads),
                               spec.get("gpuHourCostUsd"))
        out["_kvByRole"] = kv_by_role(w)  # merged into status.roles by _write_status
        return out

    def _write_status(self, fleet: Mapping[str, Any], out: Outcome, workloads: list[Any],
                      endpoint: str | None, observed: Mapping[str, Any] | None = None) -> None:
        meta = fleet["metadata"]
        current = fleet.get("status") or {}
        status = fleet_status(generation=meta.get("generation"), previous=current.get("conditions") or [],
                              problem=out.problem, workloads=workloads, endpoint=endpoint, now=now())
        observed = dict(observed or {})
        for role, kv in observed.pop("_kvByRole", {}).items():
            if role in status["roles"]:
                status["roles"][role]["kvPressure"] = kv
        status.update(observed)
        previous = current.get("conditions") or []
        status["conditions"] += [condition(t, ok, reason, message, meta.get("generation"), previous, now())
                                 for t, ok, reason, message in out.conditions]
        # written as the typed status model has it (a field the CRD would prune or refuse fails here)
        status = InferenceFleetStatus.model_validate(status).to_k8s()
        if not status_changed(current, status):
            return
        writes.apply_status(self.kube, "InferenceFleet", KVFLEET, meta["namespace"], meta["name"], status)
        out.status_written = True
        for ev in out.plan.events if out.plan is not None else ():
            writes.event(self.kube, fleet, ev.reason, ev.message, ev.type)
        old = {c.get("type"): c for c in current.get("conditions") or ()}.get("Degraded") or {}
        new = {c["type"]: c for c in status["conditions"]}["Degraded"]
        if (old.get("status"), old.get("reason")) != (new["status"], new["reason"]):
            if new["status"] == "True":
                writes.event(self.kube, fleet, new["reason"], new["message"], "Warning")
            elif old.get("status") == "True":
                writes.event(self.kube, fleet, "Recovered", f"No longer degraded ({old.get('reason')}).")

    # -- referenced kinds -----------------------------------------------------------------------
    def sync_references(self, namespace: str) -> int:
        """Write usedByFleets (and an Available=Valid condition) on every referenced kind in a namespace.

        Reads the fleets of the namespace and is idempotent; returns how many statuses changed.
        """
        from kvfleet.operator.api.validate import InvalidResource, parse

        from .resolve import clean

        users: dict[tuple[str, str], set[str]] = {}
        for fleet in self.kube.list("InferenceFleet", namespace):
            if fleet["metadata"].get("deletionTimestamp"):
                continue
            for ref in references(fleet.get("spec") or {}):
                users.setdefault((ref.kind, ref.name), set()).add(fleet["metadata"]["name"])
        changed = 0
        for kind in REF_KINDS:
            for obj in self.kube.list(kind, namespace):
                meta = obj["metadata"]
                try:
                    parse(clean(obj))
                    valid = (True, f"The {kind} is valid.")
                except InvalidResource as exc:
                    valid = (False, str(exc))
                current = obj.get("status") or {}
                status = used_by_status(current, users.get((kind, meta["name"]), ()), meta.get("generation"),
                                        valid, now())
                if status_changed(current, status):
                    writes.apply_status(self.kube, kind, KVFLEET, namespace, meta["name"], status)
                    changed += 1
        return changed
