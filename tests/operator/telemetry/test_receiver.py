"""The dataplane's real OTLP exporters -> the operator's receiver -> per-fleet windows.

Every request is counted even when no span is exported (sampler off); attainment, percentiles and
KV gauges come out per fleet; unattributable points are dropped and counted; a malformed export is
refused with INVALID_ARGUMENT and the receiver keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from kvfleet.dataplane import tracing
from kvfleet.dataplane.engine.api import EngineStats
from kvfleet.operator.telemetry.receiver import Receiver, serve
from kvfleet.operator.telemetry.status import kv_by_role
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON


@pytest.fixture
def receiver():
    """A receiver on 127.0.0.1:<free port>, serving from its own event loop thread."""
    rec = Receiver()
    loop = asyncio.new_event_loop()
    started: list[int] = []
    stop = asyncio.Event()

    async def main():
        server, port = await serve(rec, "127.0.0.1", 0)
        started.append(port)
        await stop.wait()
        await server.stop(grace=None)

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield rec, started[0]
    loop.call_soon_threadsafe(stop.set)
    t.join(timeout=10)


def _telemetry(monkeypatch, port: int, role: str, pod: str, sampler) -> tracing.Telemetry:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv(tracing.USER_ENDPOINT_ENV, raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"kvfleet.fleet=chat,kvfleet.role={role},"
                                                   f"k8s.namespace.name=ml,k8s.pod.name={pod}")
    monkeypatch.setenv("KVFLEET_METRICS_INTERVAL_MS", "60000")  # exported by the flush below
    return tracing.configure(role, sampler=sampler)


def _flush(tel: tracing.Telemetry) -> None:
    for p in tel.providers:
        p.force_flush()


def _requests(tel: tracing.Telemetry, n: int, klass: str, ttft_s: float, target: tracing.SLOTarget) -> None:
    for _ in range(n):
        rt = tracing.RequestTrace(tel, "chat", "m", "base", klass, target, start=time.monotonic() - ttft_s)
        rt.first_token()
        rt.finish(10, 1, "stop")


def test_every_request_counts_even_with_no_span_exported(receiver, monkeypatch):
    rec, port = receiver
    tel = _telemetry(monkeypatch, port, "router", "router-0", ALWAYS_OFF)
    target = tracing.SLOTarget(ttft_ms=100, tpot_ms=50)
    _requests(tel, 7, "interactive", 0.01, target)  # attained
    _requests(tel, 3, "interactive", 0.3, target)  # TTFT 300 ms > 100 ms
    _requests(tel, 4, "batch", 0.01, tracing.SLOTarget(1000, 100))
    tel.observe_engine(lambda: EngineStats(1, 2, 100, 25, 0, 0, 0, 0))
    _flush(tel)
    w = rec.windows.fleet("ml", "chat", time.time())
    by = {c.name: c for c in w.classes}
    assert (by["interactive"].requests, by["interactive"].attained) == (10, 7)
    assert (by["interactive"].ttft_attained, by["interactive"].tpot_attained) == (7, 10)  # one output token: no TPOT
    assert (by["batch"].requests, by["batch"].attained) == (4, 4)
    assert by["interactive"].attainment == pytest.approx(0.7)
    assert by["interactive"].ttft_p90_ms == 500  # the 300 ms requests' bucket (upper bound)
    assert rec.spans.get(("ml", "chat"), 0) == 0  # nothing sampled, everything counted
    (role,) = w.roles
    assert (role.role, role.kv_pressure, role.queue_depth) == ("router", 0.25, 2)
    assert kv_by_role(w) == {"router": 0.25}  # status.roles.<role>.kvPressure
    assert w.data_age_s is not None and w.data_age_s < 30
    # a second export of the same cumulative counters adds nothing: a request counts once
    _flush(tel)
    assert {c.name: c.requests for c in rec.windows.fleet("ml", "chat", time.time()).classes}["interactive"] == 10
    tel.shutdown()


def test_sampled_spans_carry_the_breakdown(receiver, monkeypatch):
    rec, port = receiver
    tel = _telemetry(monkeypatch, port, "router", "router-1", ALWAYS_ON)
    rt = tracing.RequestTrace(tel, "chat", "m", "base", "interactive", tracing.SLOTarget(100, 50))
    tracing.annotate(**{"kvfleet.prefill_ms": 12.5, "kvfleet.transfer_ms": 2.5})
    rt.first_token()
    rt.finish(10, 3, "stop")
    _flush(tel)
    assert rec.spans[("ml", "chat")] == 1
    mean = rec.mean_breakdown("ml", "chat")
    assert mean["kvfleet.prefill_ms"] == 12.5 and mean["kvfleet.transfer_ms"] == 2.5 and "kvfleet.ttft_ms" in mean
    tel.shutdown()


def test_unattributed_points_are_dropped_and_malformed_exports_refused(receiver):
    rec, port = receiver
    bad_hist = metrics_pb2.Metric(name="kvfleet.ttft", histogram=metrics_pb2.Histogram(data_points=[
        metrics_pb2.HistogramDataPoint(bucket_counts=[1, 2], explicit_bounds=[1.0, 2.0, 3.0])]))
    ours = [KeyValue(key="kvfleet.fleet", value=AnyValue(string_value="chat")),
            KeyValue(key="k8s.namespace.name", value=AnyValue(string_value="ml"))]
    counter = metrics_pb2.Metric(name="kvfleet.requests", sum=metrics_pb2.Sum(data_points=[
        metrics_pb2.NumberDataPoint(as_int=5, time_unix_nano=time.time_ns())]))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = mgrpc.MetricsServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(mpb.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
                resource={"attributes": ours}, scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[bad_hist])])]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bucket counts" in e.value.details()
        stub.Export(mpb.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
            scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[counter])])]))  # no fleet on the resource
    assert rec.windows.dropped == 1 and rec.windows.fleet("ml", "chat", time.time()).classes == []


def test_the_pool_reports_hit_rate_churn_and_bytes(receiver, monkeypatch):
    """kvfleet.pool.* from a mempool pod become the mempool role's window and the fleet's pool status."""
    from types import SimpleNamespace

    from kvfleet.operator.telemetry.status import telemetry_status

    rec, port = receiver
    tel = _telemetry(monkeypatch, port, "mempool", "pool-0", ALWAYS_OFF)
    stats = SimpleNamespace(used_bytes=3 << 20, capacity_bytes=8 << 20, pinned_bytes=0, lookup_keys=40, hit_keys=30,
                            insertions=10, evictions=2, bytes_in=1, bytes_out=1)
    tel.observe_pool(lambda: stats)
    _flush(tel)
    w = rec.windows.fleet("ml", "chat", time.time())
    (pool,) = [r for r in w.roles if r.role == "mempool"]
    assert (pool.pool_hit_rate, pool.pool_churn, pool.pool_bytes) == (0.75, 0.2, 3 << 20)
    st = telemetry_status(w, 60.0, [], gpus=0, gpu_hour_cost_usd=None)
    assert st["poolHitRate"] == 0.75 and st["poolBytes"] == 3 << 20
    tel.shutdown()
