"""Traces and counts of a disaggregated fleet, as a real OpenTelemetry Collector receives them.

Router, prefill and decode run as processes on loopback (as in test_disaggregated.py) and export by
OTLP/gRPC to both of their endpoints -- `OTEL_EXPORTER_OTLP_ENDPOINT` (the operator's) and
`KVFLEET_OTLP_USER_ENDPOINT` (the user's) -- which are two receivers of one `otelcol` (built from Go
modules by e2e/build-collector.sh) writing OTLP JSON to a file each. After the roles stop (their
exporters flush) and the collector stops (its file exporters flush), the files must hold, on each
endpoint: one trace per request, rooted at the router's request span with the GenAI and kvfleet
attributes, the prefill and decode spans below it; and the unsampled `kvfleet.requests` counter
counting every request, also when the sampler keeps no span at all.
"""

from __future__ import annotations

import openai
import pytest
from roles_testlib import RoleProcess, engine_config_file, role, router, start_all

from e2e.otelcol import Collector, Span, ancestors, trace_tree

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
RESOURCE = "kvfleet.fleet=traced,kvfleet.namespace=default,deployment.environment=test"
# interactive promises what the tiny model always meets; batch promises what nothing meets
TARGETS = {"interactive": (120_000.0, 60_000.0), "batch": (0.001, 0.001)}
ENDPOINTS = ("operator", "user")


def fleet_env(col: Collector, ratio: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": col.endpoint("operator"),
            "KVFLEET_OTLP_USER_ENDPOINT": col.endpoint("user"),
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": ratio,
            "OTEL_RESOURCE_ATTRIBUTES": RESOURCE, "KVFLEET_METRICS_INTERVAL_MS": "2000"}


def start_fleet(tmp, tiny_model_dir, env: dict[str, str]) -> list[RoleProcess]:
    cfg = engine_config_file(tmp, tiny_model_dir, "tiny")
    pre, dec = role(tmp, "prefill", "prefill", cfg, env), role(tmp, "decode", "decode", cfg, env)
    start_all(pre, dec)
    rtr = router(tmp, "tiny", "tiny", tiny_model_dir, [f"prefill=tiny@{pre.address}", f"decode=tiny@{dec.address}"],
                 sheddable=("batch",), env=env, targets=TARGETS)
    start_all(rtr)
    return [rtr, pre, dec]


def send_requests(address: str) -> list[dict]:
    """Five requests (text, streamed text, chat, chat as class `batch` by header, a one-token text); what
    each should show."""
    client = openai.OpenAI(base_url=f"{address}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Hello there"}]
    sent = []
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, **GREEDY)
    sent.append({"op": "text_completion", "cls": "interactive", "usage": r.usage})
    chunks = list(client.completions.create(model="tiny", prompt="Numbers: 1 2 3", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    sent.append({"op": "text_completion", "cls": "interactive", "usage": chunks[-1].usage})
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, **GREEDY)
    sent.append({"op": "chat", "cls": "interactive", "usage": r.usage})
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                       extra_headers={"x-kvfleet-slo-class": "batch"}, **GREEDY)
    sent.append({"op": "chat", "cls": "batch", "usage": r.usage})
    # one token: prefill answers it, no decode stream; its span ends right after the first token
    r = client.completions.create(model="tiny", prompt="One token please", max_tokens=1, **GREEDY)
    sent.append({"op": "text_completion", "cls": "interactive", "usage": r.usage})
    return sent


def stop_all(procs: list[RoleProcess], col: Collector) -> None:
    """Roles first (SIGTERM: their batch span processors and metric readers flush), then the collector."""
    codes = [p.stop() for p in procs]
    assert codes == [0, 0, 0], codes
    assert col.stop() == 0, col.log.read_text()


def check_trace(spans: list[Span], want: dict) -> None:
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 1, [(s.name, s.parent_span_id) for s in spans]
    root = roots[0]
    assert root.name == f"{want['op']} tiny" and root.resource["kvfleet.role"] == "router"
    assert root.resource["service.name"] == "kvfleet-router"
    a = root.attributes
    assert a["gen_ai.operation.name"] == want["op"] and a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.usage.input_tokens"] == want["usage"].prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == want["usage"].completion_tokens
    assert a["kvfleet.slo_class"] == want["cls"]
    assert a["kvfleet.slo.attained"] is (want["cls"] == "interactive")
    assert a["kvfleet.ttft_ms"] > 0 and a["kvfleet.prefill_ms"] > 0 and a["kvfleet.transfer_ms"] >= 0
    # the span covers the request from its arrival (queueing for KV room included), as TTFT does
    assert (root.end_ns - root.start_ns) / 1e6 >= a["kvfleet.ttft_ms"] >= a["kvfleet.queue_ms"]
    hops = {s.resource["kvfleet.role"]: s for s in spans if s is not root}
    one_token = want["usage"].completion_tokens == 1
    assert sorted(hops) == (["prefill"] if one_token else ["decode", "prefill"]), \
        [(s.name, s.resource.get("kvfleet.role")) for s in spans]
    pre, dec = hops["prefill"], hops.get("decode", hops["prefill"])
    assert pre.name == "prefill" and dec.name == ("prefill" if one_token else "decode")
    if not one_token:  # a one-token request's KV stays on prefill: nothing to transfer
        assert a["kvfleet.kv_transfer_ok"] is True and dec.attributes["kvfleet.kv_received"] is True
        assert pre.end_ns <= dec.start_ns  # decode streams after prefill handed over
    # each hop is parented on the router's request span (the traceparent it sent) and starts within it
    # (decode's span may end a moment after the router's: the router ends its span on the last chunk,
    # decode's server span when its stream closes after sending it)
    for hop in (pre, dec):
        assert hop.parent_span_id == root.span_id and ancestors(hop, by_id) == [root]
        assert root.start_ns <= hop.start_ns <= root.end_ns
        assert hop.attributes["kvfleet.request_id"].startswith(root.attributes["kvfleet.request_id"])
    assert pre.attributes["gen_ai.usage.input_tokens"] == want["usage"].prompt_tokens
    for s in spans:
        assert s.resource["kvfleet.fleet"] == "traced" and s.resource["deployment.environment"] == "test"


def test_every_request_is_one_trace_on_both_endpoints(tmp_path, tiny_model_dir, otel_collector):
    col = otel_collector
    procs = start_fleet(tmp_path, tiny_model_dir, fleet_env(col, "1.0"))
    try:
        sent = send_requests(procs[0].address)
    finally:
        stop_all(procs, col)
    per_endpoint = {}
    for ep in ENDPOINTS:
        spans = col.spans(ep)
        traces = sorted(trace_tree(spans).values(), key=lambda t: min(s.start_ns for s in t))
        assert len(traces) == len(sent), [[s.name for s in t] for t in traces]
        for t, want in zip(traces, sent, strict=True):
            check_trace(t, want)
        per_endpoint[ep] = sorted((s.trace_id, s.span_id) for s in spans)
        router_counts = {"kvfleet.role": "router"}
        assert col.counter_total(ep, "kvfleet.requests", router_counts) == len(sent)
        assert col.counter_total(ep, "kvfleet.requests", {**router_counts, "kvfleet.attained": True}) == 4
        assert col.counter_total(ep, "kvfleet.requests", {"kvfleet.slo_class": "batch",
                                                          "kvfleet.attained": False}) == 1
    assert per_endpoint["operator"] == per_endpoint["user"]  # the same spans reach both, once each


def test_sampled_out_requests_still_count(tmp_path, tiny_model_dir, otel_collector):
    col = otel_collector
    procs = start_fleet(tmp_path, tiny_model_dir, fleet_env(col, "0"))
    try:
        sent = send_requests(procs[0].address)
    finally:
        stop_all(procs, col)
    for ep in ENDPOINTS:
        assert col.spans(ep) == []
        assert col.counter_total(ep, "kvfleet.requests") == len(sent)
        assert col.counter_total(ep, "kvfleet.requests", {"kvfleet.attained": True}) == 4
