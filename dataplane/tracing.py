"""The one place that knows OpenTelemetry: a span per request and per hop, and unsampled counts.

Every role calls `configure(role)` once. A request gets a span (`request_span`) where it enters
the fleet (the router, `kvfleet serve` or a colocated engine pod); the prefill and decode hops get
child spans, the W3C `traceparent` carried in gRPC metadata (`inject` / `extract`). Attributes follow
the OpenTelemetry GenAI conventions (`gen_ai.*`) plus kvfleet's own (`kvfleet.*`, documented in the
README): SLO class, TTFT, TPOT, attained or not, queue / prefill / transfer / decode time, prefix
hit tokens, KV utilisation at admission.

Sampling never biases attainment: spans are sampled (`OTEL_TRACES_SAMPLER[_ARG]`), but every
finished request also adds to the `kvfleet.requests` counter and the TTFT/TPOT histograms, which
are exported whatever the sampler says. Both go by OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT` (the
operator's receiver) and to `KVFLEET_OTLP_USER_ENDPOINT` (the user's collector) when set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

USER_ENDPOINT_ENV = "KVFLEET_OTLP_USER_ENDPOINT"
TTFT_BUCKETS_MS = (10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000)
TPOT_BUCKETS_MS = (2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000)


@dataclass(frozen=True)
class SLOTarget:
    """What a class promises: the request is attained when both hold."""

    ttft_ms: float
    tpot_ms: float


@dataclass
class Telemetry:
    """A role's tracer and instruments (from `configure`)."""

    role: str
    tracer: trace.Tracer
    meter: Meter
    providers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        m = self.meter
        self.requests = m.create_counter("kvfleet.requests", unit="{request}",
                                         description="Finished requests by SLO class and whether the SLO was met.")
        self.ttft = m.create_histogram("kvfleet.ttft", unit="ms", description="Time to first token.",
                                       explicit_bucket_boundaries_advisory=TTFT_BUCKETS_MS)
        self.tpot = m.create_histogram("kvfleet.tpot", unit="ms", description="Time per output token after the first.",
                                       explicit_bucket_boundaries_advisory=TPOT_BUCKETS_MS)
        self.tokens = m.create_counter("kvfleet.tokens", unit="{token}", description="Prompt and output tokens.")

    def observe_engine(self, stats: Any) -> None:
        """Gauges read from `stats()` (an `EngineStats`) at each export: KV utilisation and queue depth."""
        from opentelemetry.metrics import Observation

        def kv(_: Any) -> list[Observation]:
            s = stats()
            return [Observation(s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)]

        def queue(_: Any) -> list[Observation]:
            return [Observation(stats().num_waiting)]

        self.meter.create_observable_gauge("kvfleet.kv.utilisation", [kv], unit="1",
                                           description="Fraction of KV-cache blocks in use.")
        self.meter.create_observable_gauge("kvfleet.queue.depth", [queue], unit="{request}",
                                           description="Requests waiting for the engine.")

    def observe_router(self, queued: Any, prefix_hit_rate: Any = None, index_blocks: Any = None) -> None:
        """Gauges of the requests waiting in the router for KV room (`queued()` at each export) and of its
        prefix index (estimated hit rate of the pods it picked, block hashes it tracks)."""
        from opentelemetry.metrics import Observation

        self.meter.create_observable_gauge("kvfleet.router.queued", [lambda _: [Observation(queued())]],
                                           unit="{request}", description="Requests waiting for KV room.")
        if prefix_hit_rate is not None:
            self.meter.create_observable_gauge(
                "kvfleet.router.prefix_hit_rate", [lambda _: [Observation(prefix_hit_rate())]], unit="1",
                description="Prompt blocks the chosen prefill pods held, per the router's index / blocks routed.")
        if index_blocks is not None:
            self.meter.create_observable_gauge(
                "kvfleet.router.index_blocks", [lambda _: [Observation(index_blocks())]], unit="{block}",
                description="Block hashes in the router's prefix index.")

    def observe_pool(self, stats: Any) -> None:
        """The memory pool's gauges and counters, read from `stats()` (a `PoolStats`) at each export."""
        from opentelemetry.metrics import Observation

        def read(attr: str) -> Any:
            return lambda _: [Observation(getattr(stats(), attr))]

        def utilisation(_: Any) -> list[Observation]:
            s = stats()
            return [Observation(s.used_bytes / s.capacity_bytes if s.capacity_bytes else 0.0)]

        self.meter.create_observable_gauge("kvfleet.pool.utilisation", [utilisation], unit="1",
                                           description="Fraction of the pool's capacity holding KV blocks.")
        self.meter.create_observable_gauge("kvfleet.pool.pinned", [read("pinned_bytes")], unit="By",
                                           description="KV bytes pinned for SLO classes.")
        self.meter.create_observable_gauge("kvfleet.pool.used_bytes", [read("used_bytes")], unit="By",
                                           description="KV bytes the pool holds.")
        for name, attr, unit, what in (("lookups", "lookup_keys", "{block}", "Blocks asked for by Get."),
                                       ("hits", "hit_keys", "{block}", "Blocks Get found (hit rate = hits/lookups)."),
                                       ("insertions", "insertions", "{block}", "New blocks kept."),
                                       ("evictions", "evictions", "{block}", "Blocks evicted (churn)."),
                                       ("bytes_in", "bytes_in", "By", "Payload bytes of new blocks kept."),
                                       ("bytes_out", "bytes_out", "By", "Payload bytes served by Get.")):
            self.meter.create_observable_counter(f"kvfleet.pool.{name}", [read(attr)], unit=unit, description=what)

    def shutdown(self) -> None:
        for p in self.providers:
            with contextlib.suppress(Exception):
                p.shutdown()


def configure(role: str, span_processors: list[SpanProcessor] | None = None,
              metric_readers: list[MetricReader] | None = None, sampler: Any = None) -> Telemetry:
    """Tracer and meter for one role. Exporters: the OTLP endpoints in the environment, plus any given
    (tests pass in-memory ones). With no endpoint and nothing given, spans and counts stay in process."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", f"kvfleet-{role}"),
                                "kvfleet.role": role})
    endpoints = [e for e in (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"), os.environ.get(USER_ENDPOINT_ENV)) if e]
    processors = list(span_processors or [])
    readers = list(metric_readers or [])
    if endpoints:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        interval_ms = int(os.environ.get("KVFLEET_METRICS_INTERVAL_MS", "5000"))
        for ep in endpoints:
            insecure = ep.startswith("http://")
            processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=ep, insecure=insecure),
                                                 schedule_delay_millis=1000))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=ep, insecure=insecure),
                                                         export_interval_millis=interval_ms))
    tp = TracerProvider(resource=resource, **({"sampler": sampler} if sampler is not None else {}))
    for p in processors:
        tp.add_span_processor(p)
    mp = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(role, tp.get_tracer("kvfleet"), mp.get_meter("kvfleet"), [tp, mp])


def annotate(**attrs: Any) -> None:
    """Add attributes to the current span (a no-op outside one, or when it is not sampled)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attrs.items() if v is not None})


def inject(ctx: Any = None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the current (or given) trace context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return tuple(carrier.items())


def extract(metadata: Mapping[str, str] | Any) -> Any:
    """The trace context an incoming call carried (`context.invocation_metadata()` or a dict)."""
    carrier = dict(metadata or ())
    return propagate.extract(carrier)


@contextlib.contextmanager
def hop_span(tel: Telemetry | None, name: str, metadata: Any = (), **attrs: Any) -> Iterator[Any]:
    """A child span for a prefill/decode/transfer hop, parented on the caller's `traceparent`."""
    if tel is None:
        yield None
        return
    token = otel_context.attach(extract(metadata))
    try:
        with tel.tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER,
                                              attributes={k: v for k, v in attrs.items() if v is not None}) as span:
            yield span
    finally:
        otel_context.detach(token)


class RequestTrace:
    """One request's span and its always-counted outcome. Call `first_token()` and `finish()` once each."""

    def __init__(self, tel: Telemetry, operation: str, model: str, variant: str, slo_class: str | None,
                 target: SLOTarget | None, start: float | None = None, **attrs: Any) -> None:
        self.tel, self.model, self.variant, self.slo_class, self.target = tel, model, variant, slo_class, target
        now = time.monotonic()
        self.start = now if start is None else start
        self.first_token_time: float | None = None
        # The span starts when the request arrived (`start`, monotonic), not when this object is made:
        # tokenising and queueing for KV room come first, and TTFT (also from `start`) counts them.
        start_ns = time.time_ns() - int((now - self.start) * 1e9)
        self.span = tel.tracer.start_span(
            f"{operation} {model}", kind=trace.SpanKind.SERVER, start_time=start_ns,
            attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": model,
                        "gen_ai.system": "kvfleet", "kvfleet.variant": variant, "kvfleet.role": tel.role,
                        "kvfleet.slo_class": slo_class or "", **{k: v for k, v in attrs.items() if v is not None}})
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        self._done = False

    def first_token(self) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def set(self, **attrs: Any) -> None:
        self.span.set_attributes({k: v for k, v in attrs.items() if v is not None})

    def finish(self, input_tokens: int, output_tokens: int, finish_reason: str, cached_tokens: int = 0,
               preemptions: int = 0) -> bool | None:
        """End the span and count the request; returns whether its SLO was attained (None: no target)."""
        if self._done:
            return None
        self._done = True
        now = time.monotonic()
        ttft_ms = None if self.first_token_time is None else (self.first_token_time - self.start) * 1000
        tpot_ms = (now - self.first_token_time) * 1000 / (output_tokens - 1) \
            if self.first_token_time is not None and output_tokens > 1 else None
        attained = ttft_ok = tpot_ok = None
        if self.target is not None:
            ttft_ok = finish_reason != "abort" and ttft_ms is not None and ttft_ms <= self.target.ttft_ms
            tpot_ok = finish_reason != "abort" and (tpot_ms is None or tpot_ms <= self.target.tpot_ms)
            attained = ttft_ok and tpot_ok
        labels = {"kvfleet.slo_class": self.slo_class or "", "kvfleet.variant": self.variant,
                  "kvfleet.role": self.tel.role, "gen_ai.request.model": self.model}
        self.tel.requests.add(1, {**labels, "kvfleet.attained": bool(attained), "kvfleet.ttft_ok": bool(ttft_ok),
                                  "kvfleet.tpot_ok": bool(tpot_ok), "kvfleet.has_target": attained is not None})
        if ttft_ms is not None:
            self.tel.ttft.record(ttft_ms, labels)
        if tpot_ms is not None:
            self.tel.tpot.record(tpot_ms, labels)
        self.tel.tokens.add(input_tokens, {**labels, "gen_ai.token.type": "input"})
        self.tel.tokens.add(output_tokens, {**labels, "gen_ai.token.type": "output"})
        self.set(**{"gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
                    "gen_ai.response.finish_reasons": [finish_reason], "kvfleet.ttft_ms": ttft_ms,
                    "kvfleet.tpot_ms": tpot_ms, "kvfleet.slo.attained": attained,
                    "kvfleet.prefix_hit_tokens": cached_tokens, "kvfleet.preemptions": preemptions})
        if finish_reason == "abort":
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, "aborted"))
        self.span.end()
        with contextlib.suppress(ValueError):  # detached from another context (a cancelled task)
            otel_context.detach(self._token)
        return attained
