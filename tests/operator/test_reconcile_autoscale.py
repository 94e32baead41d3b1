"""Observe -> plan -> act through the reconciler, in memory: a fake Kubernetes client and a telemetry window.

No API server: `FakeKube` answers the reconciler's one write path, and points are fed to the receiver's
`Windows` as the OTLP receiver would. Attainment below a critical class's target scales the engine up,
with an Event and the planner's conditions in status; a manual scale is reverted, not adopted.
"""

from __future__ import annotations

import copy
import time

from fake_kube import FakeKube
from kvfleet.operator.builders import OperatorSettings
from kvfleet.operator.reconciler import Reconciler
from kvfleet.operator.telemetry.window import Source, Windows
from op_testlib import chat_fleet, colocated, objects_by_key

NS, ENGINE = "ml", "chat-smollm2-base-engine"


def _setup() -> tuple[FakeKube, Windows, Reconciler]:
    kube, windows = FakeKube(), Windows()
    for (kind, _), doc in objects_by_key().items():
        if kind != "InferenceFleet":
            doc = copy.deepcopy(doc)
            doc["metadata"]["namespace"] = NS
            kube.put(doc)
    fleet = colocated(chat_fleet(namespace=NS))
    fleet["spec"]["topology"]["engine"].update(minReplicas=1, maxReplicas=4)
    fleet["metadata"].pop("uid", None)
    kube.put(fleet)
    return kube, windows, Reconciler(kube, OperatorSettings(image="kvfleet:test"), telemetry=windows)


def _ready(kube: FakeKube) -> None:
    """What the Deployment controller would report: every replica ready and up to date."""
    for (kind, _, _), obj in kube.objects.items():
        if kind in ("Deployment", "StatefulSet"):
            n = obj["spec"]["replicas"]
            obj["status"] = {"replicas": n, "readyReplicas": n, "updatedReplicas": n,
                             "observedGeneration": obj["metadata"]["generation"]}


def _replicas(kube: FakeKube) -> int:
    return int(kube.objects[("Deployment", NS, ENGINE)]["spec"]["replicas"])


def _traffic(windows: Windows, requests: int, attained: int) -> None:
    now = time.time()
    src = Source(NS, "chat", "engine", "smollm2-base", "engine-0")
    for ok, n in ((True, attained), (False, requests - attained)):
        attrs = (("kvfleet.attained", str(ok).lower()), ("kvfleet.role", "engine"),
                 ("kvfleet.slo_class", "interactive"), ("kvfleet.tpot_ok", "true"),
                 ("kvfleet.ttft_ok", str(ok).lower()))
        windows.add(src, "kvfleet.requests", attrs, now - 30, now, (float(n),))
    windows.add(src, "kvfleet.kv.utilisation", (), now, now, (0.5,))


def test_attainment_below_target_scales_up_and_a_manual_scale_is_reverted():
    kube, windows, rec = _setup()
    out = rec.reconcile(NS, "chat")
    assert _replicas(kube) == 1 and out.requeue_after == 15.0  # the example's intervalSeconds
    conditions = {c["type"]: c for c in kube.objects[("InferenceFleet", NS, "chat")]["status"]["conditions"]}
    assert conditions["TelemetryStale"]["status"] == "True"  # no data yet: hold, and say so
    _ready(kube)

    _traffic(windows, requests=40, attained=10)  # interactive (critical, target 0.95) at 0.25
    rec.reconcile(NS, "chat")
    assert _replicas(kube) > 1
    assert any(e["reason"] == "ScaledUp" and "interactive" in e["message"] for e in kube.events)
    status = kube.objects[("InferenceFleet", NS, "chat")]["status"]
    (interactive,) = [c for c in status["sloClasses"] if c["name"] == "interactive"]
    assert (interactive["requests"], interactive["attainment"]) == (40, 0.25)
    assert status["roles"]["engine"]["kvPressure"] == 0.5
    planned = _replicas(kube)

    dep = kube.objects[("Deployment", NS, ENGINE)]
    dep["spec"]["replicas"] = planned - 1  # kubectl scale, by hand: the API server records kubectl as the owner
    dep["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]
    dep["metadata"]["generation"] += 1  # a spec change, as the API server counts it
    rec.reconcile(NS, "chat")
    assert _replicas(kube) == planned  # the planner is the one writer of replicas
    assert any(e["reason"] == "ManualScaleReverted" for e in kube.events)


def test_autoscaling_off_leaves_replicas_to_the_spec():
    kube, windows, rec = _setup()
    fleet = kube.objects[("InferenceFleet", NS, "chat")]
    fleet["spec"]["autoscaling"]["enabled"] = False
    out = rec.reconcile(NS, "chat")
    _ready(kube)
    _traffic(windows, requests=40, attained=0)
    rec.reconcile(NS, "chat")
    assert _replicas(kube) == 1 and out.requeue_after is None and out.plan is None
