"""A real OpenTelemetry Collector (built by e2e/build-collector.sh) on loopback, and what it wrote.

`Collector` starts `otelcol` with one OTLP/gRPC receiver per named endpoint (the roles export to
two: `OTEL_EXPORTER_OTLP_ENDPOINT`, the operator's, and `KVFLEET_OTLP_USER_ENDPOINT`, the user's),
each on a free loopback port and each piped to its own file exporter writing OTLP JSON lines (traces
and metrics in one file). After `stop()` (SIGTERM: the exporters flush), `spans(name)` and
`metric_points(name, metric)` read those files back in a flat, assertable shape.

    with Collector(tmp, ["operator", "user"]) as col:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": col.endpoint("operator"), ...}
        ...
    spans = col.spans("operator")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
READY = "Everything is ready. Begin running and processing data."


def find_otelcol() -> Path:
    """``$KVFLEET_OTELCOL``, else the path build-collector.sh prints (it builds if the cache is cold)."""
    if env := os.environ.get("KVFLEET_OTELCOL"):
        return Path(env)
    out = subprocess.run([str(REPO / "e2e" / "build-collector.sh")], stdout=subprocess.PIPE, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _value(v: dict[str, Any]) -> Any:
    """An OTLP JSON AnyValue as Python (int64s come as strings in OTLP JSON)."""
    if "stringValue" in v:
        return v["stringValue"]
    if "boolValue" in v:
        return v["boolValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def attrs(items: Iterable[dict[str, Any]] | None) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in items or ()}


@dataclass
class Span:
    """One span as the collector wrote it; ids are hex strings ("" for a root's parent)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    start_ns: int
    end_ns: int


@dataclass
class Collector:
    """`otelcol` with one OTLP/gRPC receiver -> file exporter pipeline (traces + metrics) per name."""

    tmp: Path
    names: list[str]
    binary: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log = self.tmp / "otelcol.log"
        self.config = self.tmp / "otelcol.yaml"

    def file(self, name: str) -> Path:
        return self.tmp / f"otlp-{name}.jsonl"

    def endpoint(self, name: str) -> str:
        """What an OTLP/gRPC exporter is pointed at (plain text: http://)."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def _write_config(self) -> None:
        # JSON is YAML: no YAML writer needed.
        receivers = {f"otlp/{n}": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{self.ports[n]}"}}}
                     for n in self.names}
        exporters = {f"file/{n}": {"path": str(self.file(n)), "format": "json", "flush_interval": "100ms"}
                     for n in self.names}
        pipelines = {f"{sig}/{n}": {"receivers": [f"otlp/{n}"], "exporters": [f"file/{n}"]}
                     for n in self.names for sig in ("traces", "metrics")}
        cfg = {"receivers": receivers, "exporters": exporters,
               "service": {"pipelines": pipelines,
                           # no self-telemetry server on :8888 (several collectors may run at once)
                           "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}}}}
        self.config.write_text(json.dumps(cfg, indent=1))

    def start(self, timeout: float = 60.0) -> Collector:
        binary = self.binary or find_otelcol()
        self.ports = {n: free_port() for n in self.names}
        self._write_config()
        self.proc = subprocess.Popen([str(binary), f"--config=file:{self.config}"], stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while READY not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")
                self.kill()
                raise RuntimeError(f"otelcol did not start:\n{text}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM (the file exporters flush and close), then the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading back --------------------------------------------------------------------

    def records(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.file(name)
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)

    def spans(self, name: str) -> list[Span]:
        out = []
        for rec in self.records(name):
            for rs in rec.get("resourceSpans", []):
                res = attrs(rs.get("resource", {}).get("attributes"))
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        out.append(Span(s["name"], s["traceId"], s["spanId"], s.get("parentSpanId", ""),
                                        int(s.get("kind", 0)), attrs(s.get("attributes")), res,
                                        int(s["startTimeUnixNano"]), int(s["endTimeUnixNano"])))
        return out

    def metric_points(self, name: str, metric: str) -> list[dict[str, Any]]:
        """Every data point of `metric`, each as {"resource", "attributes", "time_ns", "value"} (sums and
        gauges: value; histograms: count and sum), plus "temporality" for sums."""
        out = []
        for rec in self.records(name):
            for rm in rec.get("resourceMetrics", []):
                res = attrs(rm.get("resource", {}).get("attributes"))
                for sm in rm.get("scopeMetrics", []):
                    for m in sm.get("metrics", []):
                        if m["name"] != metric:
                            continue
                        kind = next(k for k in ("sum", "gauge", "histogram") if k in m)
                        for p in m[kind].get("dataPoints", []):
                            value = p.get("asInt", p.get("asDouble")) if kind != "histogram" else None
                            out.append({"resource": res, "attributes": attrs(p.get("attributes")),
                                        "time_ns": int(p.get("timeUnixNano", 0)),
                                        "value": None if value is None else float(value),
                                        "count": int(p.get("count", 0)), "sum": p.get("sum"),
                                        "temporality": m[kind].get("aggregationTemporality")})
        return out

    def counter_total(self, name: str, metric: str, where: dict[str, Any] | None = None) -> float:
        """A cumulative counter's total: the latest point of each stream (resource + attributes), added up."""
        latest: dict[str, tuple[int, float]] = {}
        for p in self.metric_points(name, metric):
            if where and any(p["attributes"].get(k) != v for k, v in where.items()):
                continue
            assert p["temporality"] in (2, "AGGREGATION_TEMPORALITY_CUMULATIVE"), p
            key = json.dumps([p["resource"], p["attributes"]], sort_keys=True)
            if key not in latest or p["time_ns"] >= latest[key][0]:
                latest[key] = (p["time_ns"], p["value"] or 0.0)
        return sum(v for _, v in latest.values())


def trace_tree(spans: list[Span]) -> dict[str, list[Span]]:
    """Spans by trace id."""
    out: dict[str, list[Span]] = {}
    for s in spans:
        out.setdefault(s.trace_id, []).append(s)
    return out


def ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    chain, seen = [], set()
    while span.parent_span_id and span.parent_span_id in by_id and span.parent_span_id not in seen:
        seen.add(span.parent_span_id)
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain

