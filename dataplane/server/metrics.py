"""Prometheus metrics of one server: request outcomes, token counts, latencies, engine state.

Each app owns a `CollectorRegistry` (several servers can live in one test
process). Engine gauges are read from `AsyncEngine.stats()` at scrape time,
so they are never stale. Names follow Prometheus conventions (`_total`,
`_seconds`); latency histograms carry `model` and `slo_class` labels so SLO
attainment can be computed per class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kvfleet.dataplane.engine.api import EngineStats
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's stats snapshot on every scrape."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("kvfleet_num_requests_running", "Requests the engine is generating for.",
                                value=s.num_running)
        yield GaugeMetricFamily("kvfleet_num_requests_waiting", "Requests queued in the engine.",
                                value=s.num_waiting)
        yield GaugeMetricFamily("kvfleet_kv_blocks_used", "KV-cache blocks in use.", value=s.kv_blocks_used)
        yield GaugeMetricFamily("kvfleet_kv_blocks_total", "KV-cache blocks in the engine.",
                                value=s.kv_blocks_total)
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield GaugeMetricFamily("kvfleet_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", value=usage)
        yield CounterMetricFamily("kvfleet_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                                  value=s.prefix_cache_hit_tokens)
        yield CounterMetricFamily("kvfleet_shared_prefix_tokens", "Prompt tokens reused from a sibling variant's "
                                  "cached KV, recomputing only its plan's layers (DroidSpeak).",
                                  value=s.shared_prefix_tokens)
        yield CounterMetricFamily("kvfleet_engine_prompt_tokens", "Prompt tokens the engine has processed.",
                                  value=s.prompt_tokens)
        yield CounterMetricFamily("kvfleet_engine_generation_tokens", "Tokens the engine has generated.",
                                  value=s.generation_tokens)
        yield CounterMetricFamily("kvfleet_num_preemptions", "Sequences preempted (recomputed later).",
                                  value=s.num_preemptions)


class ServerMetrics:
    """What the HTTP layer records; `render()` is the body of GET /metrics."""

    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvfleet_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("kvfleet_requests_finished", "Generation requests by finish reason.",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("kvfleet_prompt_tokens", "Prompt tokens of served requests.",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("kvfleet_generation_tokens", "Completion tokens of served requests.",
                                         ["model"], registry=r)
        labels = ["model", "slo_class"]
        self.ttft = Histogram("kvfleet_time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("kvfleet_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", labels,
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("kvfleet_e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats))

    def observe_request(self, model: str, slo_class: str | None, *, prompt_tokens: int, completion_tokens: int,
                        finish_reason: str, ttft_s: float | None, e2e_s: float) -> None:
        """Record one finished generation (called once per request, streaming or not)."""
        cls = slo_class or ""
        self.finished.labels(model, finish_reason).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model, cls).observe(ttft_s)
            if completion_tokens > 1:
                self.tpot.labels(model, cls).observe((e2e_s - ttft_s) / (completion_tokens - 1))
        self.e2e.labels(model, cls).observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
