"""kopf decorators only: every handler is a few lines that enqueue work for the Controller.

Triggers and what they enqueue:
  InferenceFleet created / updated / resumed      -> that fleet, and its namespace's references
  InferenceFleet deleted (watch event)             -> its namespace's references (usedByFleets)
  ModelVariant / CachePolicy / SLOClass changed    -> the fleets that reference it (kopf index), the references
  a child Deployment/StatefulSet/Service/ConfigMap -> its fleet (drift, deletions, readiness for status)
  every --resync-seconds                           -> every known fleet (the periodic timer)

No handler returns a value (kopf writes nothing under status), progress and the
diff base live in `kvfleet.io/*` annotations, and no finalizer is used: fleets
are cleaned up by owner references and the garbage collector even when the
operator is not running. (kopf timers and daemons would add a finalizer; the
Controller's resync loop is the periodic timer instead.)
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .builders import OperatorSettings
from .builders.names import LABEL_FLEET, MANAGED_BY
from .cache import ObjectCache
from .controller import FLEET, REFS, Controller, Key
from .kube import Kube
from .peering import PeeringGate
from .reconciler import Reconciler
from .resolve import references
from .telemetry.receiver import Receiver
from .telemetry.receiver import serve as serve_otlp

GROUP, VERSION = "kvfleet.io", "v1alpha1"
FLEETS = (GROUP, VERSION, "inferencefleets")
REFERENCED = ((GROUP, VERSION, "modelvariants"), (GROUP, VERSION, "cachepolicies"), (GROUP, VERSION, "sloclasses"))
CHILDREN = (("apps", "v1", "deployments", "Deployment"), ("apps", "v1", "statefulsets", "StatefulSet"),
            ("", "v1", "services", "Service"), ("", "v1", "configmaps", "ConfigMap"),
            ("", "v1", "serviceaccounts", "ServiceAccount"),
            ("rbac.authorization.k8s.io", "v1", "roles", "Role"),
            ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"))
CHILD_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_FLEET: kopf.PRESENT}
CHILD_DELAY_S = 0.5  # coalesce bursts of child status updates into one reconcile


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings: annotations for progress, no handler status, quiet posting, bounded retries."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvfleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvfleet.io", key="last-handled-configuration")
    settings.persistence.finalizer = "kvfleet.io/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Configure kopf, build the Reconciler (with its read cache) and start the Controller."""
    configure(settings)
    opts = memo.options
    receiver, endpoint = None, opts.otlp_endpoint or None
    if getattr(opts, "otlp_listen", ""):
        host, _, port = opts.otlp_listen.rpartition(":")
        receiver = Receiver()
        memo.otlp_server, bound = await serve_otlp(receiver, host or "0.0.0.0", int(port))
        endpoint = endpoint or f"http://127.0.0.1:{bound}"
        logging.getLogger(__name__).info("OTLP receiver on %s:%d; pods export to %s", host, bound, endpoint)
    reconciler = Reconciler(Kube(), OperatorSettings(image=opts.image, image_pull_policy=opts.image_pull_policy,
                                                     otlp_endpoint=endpoint,
                                                     host_path_prefixes=tuple(opts.host_path_prefixes)),
                            cache=ObjectCache(), telemetry=receiver.windows if receiver else None)
    gate = None
    if opts.peering:
        gate = PeeringGate(reconciler.kube, opts.peering, opts.identity, opts.priority).active
    memo.controller = Controller(reconciler, workers=opts.workers, resync_seconds=opts.resync_seconds, gate=gate)
    memo.cache = reconciler.cache
    memo.controller.start()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Stop the Controller (and the OTLP receiver) when kopf stops."""
    await memo.controller.stop()
    if getattr(memo, "otlp_server", None) is not None:
        await memo.otlp_server.stop(grace=1.0)


@kopf.on.probe(id="queue")
def queue_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Served on the liveness endpoint: reconcile counts and recent durations (seconds)."""
    stats = memo.controller.stats
    durations = sorted(stats.durations)

    def pct(q: float) -> float:
        return round(durations[min(len(durations) - 1, int(q * len(durations)))], 4) if durations else 0.0

    return {"reconciles": stats.reconciles, "failures": stats.failures, "fleets": len(memo.controller.known),
            "p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": durations[-1] if durations else 0.0}


@kopf.index(*FLEETS)
def fleet_refs(namespace: str, name: str, spec: Any, **_: Any) -> dict[tuple[str, str, str], str]:
    """(namespace, kind, name) of every referenced object -> the fleets naming it."""
    return {(namespace, ref.kind, ref.name): name for ref in references(spec or {})}


@kopf.on.resume(*FLEETS)
@kopf.on.create(*FLEETS)
@kopf.on.update(*FLEETS)
async def fleet_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A fleet was created, its spec/labels/annotations changed, or the operator (re)started."""
    memo.controller.enqueue(Key(FLEET, namespace, name))
    memo.controller.enqueue(Key(REFS, namespace))


@kopf.on.event(*FLEETS, when=lambda type, **_: type == "DELETED")
async def fleet_deleted(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A fleet is gone: stop resyncing it and drop it from usedByFleets."""
    memo.controller.forget(Key(FLEET, namespace, name))
    memo.controller.enqueue(Key(REFS, namespace))


async def referenced_changed(type: str | None, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                             fleet_refs: kopf.Index[tuple[str, str, str], str], **_: Any) -> None:
    """A referenced object appeared, changed or went away: its fleets reconcile again."""
    remember(memo.cache, type, body["kind"], body, namespace, name)
    seen = (body.get("status") or {}).get("observedGeneration")
    if type != "DELETED" and seen is not None and seen == body["metadata"].get("generation"):
        return  # only our own status write changed
    for fleet in fleet_refs.get((namespace, body["kind"], name), ()):
        memo.controller.enqueue(Key(FLEET, namespace, fleet))
    memo.controller.enqueue(Key(REFS, namespace))


for _resource in REFERENCED:
    kopf.on.event(*_resource, id=f"referenced-{_resource[2]}")(referenced_changed)


def child_handler(kind: str) -> Any:
    """The watch-event handler of one child kind."""

    async def child_changed(type: str | None, body: kopf.Body, namespace: str, name: str, labels: kopf.Labels,
                            memo: kopf.Memo, **_: Any) -> None:
        """A child changed (drift, a hand edit, a deletion, a readiness change): its fleet reconciles."""
        remember(memo.cache, type, kind, body, namespace, name)
        delay = 0.0 if type == "DELETED" else CHILD_DELAY_S
        memo.controller.enqueue(Key(FLEET, namespace, labels[LABEL_FLEET]), delay=delay)

    return child_changed


def remember(cache: ObjectCache, type: str | None, kind: str, body: kopf.Body, namespace: str, name: str) -> None:
    """Keep the read cache in step with the watch stream."""
    if type == "DELETED":
        cache.remove(kind, namespace, name)
    else:
        cache.put(kind, body)


for _group, _version, _plural, _kind in CHILDREN:
    kopf.on.event(_group, _version, _plural, labels=CHILD_LABELS, id=f"child-{_plural}")(child_handler(_kind))
