"""Routing decisions and discovery, in-process (no processes, no cluster): the fakes of the router's seams."""

from __future__ import annotations

from types import SimpleNamespace

from kvfleet.dataplane.roles.disaggregated import DisaggregatedEngine
from kvfleet.dataplane.roles.discovery import Endpoint, KubernetesDiscovery, StaticDiscovery
from kvfleet.dataplane.roles.routing import Candidate, RoutingPolicy
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb


def _engine(*eps: Endpoint) -> tuple[DisaggregatedEngine, StaticDiscovery]:
    disc = StaticDiscovery(list(eps))
    return DisaggregatedEngine(disc, ["v"]), disc


def test_decode_pick_prefers_headroom_then_load_and_drops_pods_that_left():
    a, b = Endpoint("a", "h:1", "decode", "v"), Endpoint("b", "h:2", "decode", "v")
    eng, disc = _engine(a, b, Endpoint("p", "h:3", "prefill", "v"), Endpoint("x", "h:4", "decode", "other"))
    eng._load(a).stats = pb.RoleStats(kv_blocks_total=100, kv_blocks_used=90)
    eng._load(b).stats = pb.RoleStats(kv_blocks_total=100, kv_blocks_used=10)
    assert [e.name for e in eng._decode_candidates("v")] == ["b", "a"]  # most free KV first; other variants never
    disc.remove("b")
    assert [e.name for e in eng._decode_candidates("v")] == ["a"]  # gone from discovery: no new work at once


def test_decode_pick_prefers_pods_holding_the_adapter():
    a, b = Endpoint("a", "h:1", "decode", "base"), Endpoint("b", "h:2", "decode", "base")
    eng = DisaggregatedEngine(StaticDiscovery([a, b]), ["base", "support"], served_by={"support": "base"})
    eng._load(a).stats = pb.RoleStats(kv_blocks_total=100, kv_blocks_used=10)
    eng._load(b).stats = pb.RoleStats(kv_blocks_total=100, kv_blocks_used=50, adapters_resident=["support"])
    assert [e.name for e in eng._decode_candidates("support")] == ["b", "a"]  # the adapter is loaded on b
    assert [e.name for e in eng._decode_candidates("base")] == ["a", "b"]  # the base: headroom decides
    assert eng.variants == ["base"]  # one pod group serves both


def test_prefill_pick_by_load_prefers_least_loaded():
    p1, p2 = Endpoint("p1", "h:1", "prefill", "v"), Endpoint("p2", "h:2", "prefill", "v")
    disc = StaticDiscovery([p1, p2])
    eng = DisaggregatedEngine(disc, ["v"], routing=RoutingPolicy(mode="load"))

    def order() -> list[str]:
        cands = [Candidate(e.name, e.address, eng._load(e).in_flight + eng._load(e).stats.num_waiting, 0)
                 for e in (p1, p2)]
        return [c.name for c in eng.picker.pick(cands, "v", [1, 2, 3]).order]

    with eng._busy(p1):
        assert order() == ["p2", "p1"]
    eng._load(p2).stats = pb.RoleStats(num_waiting=3)
    assert order() == ["p1", "p2"]


def test_pool_shards_are_discovered_in_ordinal_order():
    pools = [Endpoint(f"f-mempool-{i}", f"10.0.0.{i}:50052", "mempool", "") for i in (10, 2, 0)]
    eng, _ = _engine(*pools, Endpoint("p", "h:3", "prefill", "v"))
    assert eng.pool_shards() == ["10.0.0.0:50052", "10.0.0.2:50052", "10.0.0.10:50052"]


def test_static_endpoints_parse_and_refuse_garbage():
    d = StaticDiscovery.parse(["prefill=base@127.0.0.1:5001", "decode=base@127.0.0.1:5002"])
    assert [e.address for e in d.endpoints("decode", "base")] == ["127.0.0.1:5002"]
    try:
        StaticDiscovery.parse(["nonsense"])
    except ValueError as e:
        assert "ROLE=VARIANT@HOST:PORT" in str(e)
    else:
        raise AssertionError("a malformed endpoint was accepted")


def _pod(name: str, role: str, ready: bool = True, ip: str = "10.0.0.1", deleting: bool = False):
    cond = [SimpleNamespace(type="Ready", status="True" if ready else "False")]
    return SimpleNamespace(metadata=SimpleNamespace(name=name, labels={"kvfleet.io/role": role, "kvfleet.io/variant": "v"},
                                                    deletion_timestamp="now" if deleting else None),
                           status=SimpleNamespace(pod_ip=ip, phase="Running", conditions=cond))


def test_kubernetes_discovery_keeps_ready_serving_pods_only():
    d = KubernetesDiscovery("ns", "fleet", 50051, api=object())
    d._apply(_pod("d1", "decode"), False)
    d._apply(_pod("d2", "decode", ready=False), False)
    d._apply(_pod("r", "router"), False)
    assert [e.address for e in d.endpoints("decode", "v")] == ["10.0.0.1:50051"]
    d._apply(_pod("d1", "decode", deleting=True), False)  # terminating: out before it is gone
    assert d.endpoints("decode", "v") == []
    d._apply(_pod("d3", "decode", ip="10.0.0.3"), False)
    d._apply(_pod("d3", "decode", ip="10.0.0.3"), True)
    assert d.endpoints("decode", "v") == []
    d._apply(_pod("m0", "mempool", ip="10.0.0.9"), False)
    assert d.endpoints("mempool", "") == []  # no pool port configured: pool pods are not the router's


def test_kubernetes_discovery_finds_pool_pods_on_the_pool_port():
    d = KubernetesDiscovery("ns", "fleet", 50051, api=object(), pool_port=50052)
    d._apply(_pod("m0", "mempool", ip="10.0.0.9"), False)
    assert [e.address for e in d.endpoints("mempool", "")] == ["10.0.0.9:50052"]  # serves every variant


def test_a_long_queue_sheds_sheddable_classes_at_once():
    import asyncio

    from kvfleet.dataplane.engine.api import EngineOverloaded, GenerationRequest
    from kvfleet.dataplane.roles.disaggregated import RouterPolicy

    eng = DisaggregatedEngine(StaticDiscovery([]), ["v"], RouterPolicy(sheddable=frozenset({"batch"}),
                                                                      max_queued_requests=2, queue_timeout_s=0.0))
    eng.queued = 2  # two critical requests already wait for KV room
    req = GenerationRequest("r", [1, 2, 3], variant="v", slo_class="batch")

    async def go():
        eng._poller = asyncio.get_running_loop().create_future()  # no background polling in this unit test
        try:
            await eng.admit(req)
        finally:
            eng._poller = None

    try:
        asyncio.run(go())
    except EngineOverloaded as e:
        assert "2 requests are queued" in str(e) and eng.counters["shed"] == 1
    else:
        raise AssertionError("a sheddable request was queued behind a full queue")
