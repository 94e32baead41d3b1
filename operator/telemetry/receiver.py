"""The operator's OTLP/gRPC receiver: the dataplane's metrics and spans, aggregated per fleet.

Pods export to it (`OTEL_EXPORTER_OTLP_ENDPOINT`, rendered by the operator). Metrics feed the
sliding windows (`window.Windows`): every request is counted there whether or not its span was
sampled. Spans are counted per fleet, with their hop breakdown (prefill, transfer, decode) kept as
running sums. A point that names no fleet is counted and dropped; a malformed export (histogram
buckets that do not match their bounds) is refused with INVALID_ARGUMENT and nothing of it is kept.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as mpb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

from .window import Attrs, Source, Windows

log = logging.getLogger(__name__)

BREAKDOWN = ("kvfleet.queue_ms", "kvfleet.prefill_ms", "kvfleet.transfer_ms", "kvfleet.ttft_ms", "kvfleet.tpot_ms")


def _value(v: Any) -> str:
    kind = v.WhichOneof("value")
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    return str(getattr(v, kind)) if kind else ""


def _attrs(kvs: Any) -> dict[str, str]:
    return {kv.key: _value(kv.value) for kv in kvs}


def source(resource_attrs: dict[str, str]) -> Source | None:
    """Which fleet, role, variant and pod a resource belongs to (None: not one of ours)."""
    fleet, ns = resource_attrs.get("kvfleet.fleet"), resource_attrs.get("k8s.namespace.name")
    if not fleet or not ns:
        return None
    pod = resource_attrs.get("k8s.pod.name") or resource_attrs.get("service.instance.id") or \
        str(sorted(resource_attrs.items()))
    return Source(ns, fleet, resource_attrs.get("kvfleet.role", ""), resource_attrs.get("kvfleet.variant", ""), pod)


class Receiver:
    """Both OTLP services' logic over one `Windows` (served by `serve`)."""

    def __init__(self, windows: Windows | None = None, clock: Any = time.time) -> None:
        self.windows = windows or Windows()
        self.clock = clock
        self.spans: dict[tuple[str, str], int] = defaultdict(int)  # (namespace, fleet) -> spans received
        self.breakdown: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # sum, count
        self.spans_dropped = 0

    async def _metrics(self, request: mpb.ExportMetricsServiceRequest,
                       context: grpc.aio.ServicerContext) -> mpb.ExportMetricsServiceResponse:
        points: list[tuple[Source | None, str, Attrs, float, float, tuple[float, ...], tuple[float, ...]]] = []
        for rm in request.resource_metrics:
            src = source(_attrs(rm.resource.attributes))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind in ("sum", "gauge"):
                        for p in getattr(m, kind).data_points:
                            v = p.as_double if p.WhichOneof("value") == "as_double" else float(p.as_int)
                            t = p.time_unix_nano / 1e9
                            start = p.start_time_unix_nano / 1e9 if kind == "sum" else t
                            points.append((src, m.name, tuple(sorted(_attrs(p.attributes).items())), start, t,
                                           (v,), ()))
                    elif kind == "histogram":
                        for p in m.histogram.data_points:
                            if len(p.bucket_counts) != len(p.explicit_bounds) + 1:
                                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                                    f"metric {m.name}: {len(p.bucket_counts)} bucket counts for "
                                                    f"{len(p.explicit_bounds)} bounds (need bounds + 1)")
                            points.append((src, m.name, tuple(sorted(_attrs(p.attributes).items())),
                                           p.start_time_unix_nano / 1e9, p.time_unix_nano / 1e9,
                                           tuple(float(c) for c in p.bucket_counts), tuple(p.explicit_bounds)))
        for src, name, attrs, start, t, values, bounds in points:
            self.windows.add(src, name, attrs, start, t, values, bounds)
        return mpb.ExportMetricsServiceResponse()

    async def _traces(self, request: tpb.ExportTraceServiceRequest,
                      context: grpc.aio.ServicerContext) -> tpb.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            src = source(_attrs(rs.resource.attributes))
            n = sum(len(ss.spans) for ss in rs.scope_spans)
            if src is None:
                self.spans_dropped += n
                continue
            key = (src.namespace, src.fleet)
            self.spans[key] += n
            for ss in rs.scope_spans:
                for span in ss.spans:
                    a = _attrs(span.attributes)
                    for name in BREAKDOWN:
                        if name in a:
                            try:
                                acc = self.breakdown[(*key, name)]
                                acc[0] += float(a[name])
                                acc[1] += 1
                            except ValueError:
                                pass
        return tpb.ExportTraceServiceResponse()

    def mean_breakdown(self, namespace: str, fleet: str) -> dict[str, float]:
        """Mean of each hop's time (ms) over the spans received so far."""
        return {name: s / c for (ns, f, name), (s, c) in self.breakdown.items() if (ns, f) == (namespace, fleet) and c}


class _Metrics(mgrpc.MetricsServiceServicer):
    def __init__(self, r: Receiver) -> None:
        self.r = r

    async def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC name
        return await self.r._metrics(request, context)


class _Traces(tgrpc.TraceServiceServicer):
    def __init__(self, r: Receiver) -> None:
        self.r = r

    async def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC name
        return await self.r._traces(request, context)


async def serve(receiver: Receiver, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the OTLP/gRPC services on host:port (0 = any); returns the server and its port."""
    server = grpc.aio.server()
    mgrpc.add_MetricsServiceServicer_to_server(_Metrics(receiver), server)
    tgrpc.add_TraceServiceServicer_to_server(_Traces(receiver), server)
    port = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, port
