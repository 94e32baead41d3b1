"""The router's prefix index and prefill picker, by value (pure: no engine, no sockets)."""

from __future__ import annotations

import pytest
from kvfleet.dataplane.kvcache.blocks import extend_block_hashes
from kvfleet.dataplane.kvcache.keys import hash_to_bytes
from kvfleet.dataplane.roles.routing import Candidate, PrefillPicker, PrefixIndex, RoutingPolicy
from kvfleet.dataplane.rpc import kvfleet_pb2 as pb

BS = 4
PROMPT = list(range(100, 133))  # 33 tokens: 8 full blocks may be hits (never the last token's block)


def hashes(tokens: list[int], variant: str = "v", codec: str = "") -> list[bytes]:
    out: list[int] = []
    extend_block_hashes(out, tokens, len(tokens) - 1, BS, variant + codec)
    return [hash_to_bytes(h) for h in out]


def batch(stored=(), removed=(), reset=False, codec=""):
    return pb.KVEventBatch(reset=reset, stored=list(stored), removed=list(removed), block_size=BS, extra_key=codec)


def test_index_counts_leading_blocks_as_the_engine_hashes_them():
    idx = PrefixIndex()
    idx.apply("a", batch(hashes(PROMPT)[:5], reset=True))
    assert idx.prompt_hashes("a", "v", PROMPT) == hashes(PROMPT)
    assert idx.leading_blocks("a", idx.prompt_hashes("a", "v", PROMPT)) == 5
    assert idx.prompt_hashes("b", "v", PROMPT) == []  # no events from b yet: nothing is claimed
    # another variant or codec hashes differently: never a match
    assert idx.leading_blocks("a", idx.prompt_hashes("a", "w", PROMPT)) == 0
    idx.apply("a", batch(removed=[hashes(PROMPT)[2]]))
    assert idx.leading_blocks("a", hashes(PROMPT)) == 2  # a hole ends the leading run


def test_reset_forgets_a_pod_and_the_index_is_bounded():
    idx = PrefixIndex(max_blocks=6)
    hs = hashes(PROMPT)
    idx.apply("a", batch(hs[:4], reset=True))
    idx.apply("b", batch(hs[:4], reset=True))
    idx.apply("a", batch(hs[4:6], reset=True))  # a restarted: a snapshot replaces what was known
    assert idx.leading_blocks("a", hs) == 0 and idx.leading_blocks("b", hs) == 4
    idx.apply("b", batch(hs[4:8]))
    assert len(idx) == 6  # oldest hashes went first
    assert idx.leading_blocks("b", hs) == 0
    idx.forget("b")
    idx.forget("a")
    assert len(idx) == 0


def cands(load_a: int = 0, load_b: int = 0, seats: int = 4) -> list[Candidate]:
    return [Candidate("a", "a", load_a, seats), Candidate("b", "b", load_b, seats)]


def test_prefix_mode_prefers_the_holder_until_it_is_saturated():
    picker = PrefillPicker(RoutingPolicy(mode="prefix"))
    picker.index.apply("a", batch(reset=True))
    picker.index.apply("b", batch(hashes(PROMPT), reset=True))
    assert picker.pick(cands(), "v", PROMPT).order[0].name == "b"
    assert picker.pick(cands(load_b=2), "v", PROMPT).order[0].name == "b"  # half busy: the prefix still wins
    assert picker.pick(cands(load_b=4), "v", PROMPT).order[0].name == "a"  # saturated: the load spills over
    other = list(range(500, 533))
    assert picker.pick(cands(load_a=1), "v", other).order[0].name == "b"  # nobody holds it: least loaded
    assert picker.hit_rate == pytest.approx(16 / 32)  # 8 of 8 blocks twice, 0 of 8 twice


def test_round_robin_and_load_modes_ignore_the_index():
    rr = PrefillPicker(RoutingPolicy(mode="round-robin"))
    rr.index.apply("b", batch(hashes(PROMPT), reset=True))
    assert [rr.pick(cands(), "v", PROMPT).order[0].name for _ in range(4)] == ["a", "b", "a", "b"]
    by_load = PrefillPicker(RoutingPolicy(mode="load"))
    by_load.index.apply("b", batch(hashes(PROMPT), reset=True))
    assert by_load.pick(cands(load_b=1), "v", PROMPT).order[0].name == "a"


def test_routing_policy_refuses_nonsense():
    with pytest.raises(ValueError, match="routing.mode"):
        RoutingPolicy(mode="random")
    with pytest.raises(ValueError, match="weights"):
        RoutingPolicy.from_dict({"prefixWeight": -1})
    assert RoutingPolicy.from_dict({"mode": "load", "loadWeight": 2}).load_weight == 2.0


def test_a_pod_serving_adapters_names_each_variants_key():
    idx = PrefixIndex()
    keys = {"v": "v", "support": "support@1f2e"}  # an adapter's KV is keyed by its weights too
    idx.apply("a", pb.KVEventBatch(reset=True, block_size=BS, prefix_keys=keys,
                                   stored=hashes(PROMPT, "support@1f2e")))
    assert idx.leading_blocks("a", idx.prompt_hashes("a", "support", PROMPT)) == 8
    assert idx.leading_blocks("a", idx.prompt_hashes("a", "v", PROMPT)) == 0  # the base never reads it


def test_a_pod_holding_the_requests_adapter_is_preferred_at_equal_load():
    cold, warm = Candidate("a", "a", 0, 4), Candidate("b", "b", 0, 4, has_adapter=True)
    for mode in ("prefix", "load"):
        picker = PrefillPicker(RoutingPolicy(mode=mode))
        assert picker.pick([cold, warm], "support", PROMPT).order[0].name == "b"
        busy = Candidate("b", "b", 3, 4, has_adapter=True)
        assert picker.pick([cold, busy], "support", PROMPT).order[0].name == "a"  # not at any load


def test_a_variant_that_reuses_a_siblings_kv_is_routed_to_the_siblings_holder():
    picker = PrefillPicker(RoutingPolicy(mode="prefix"))
    keys = {"v": "v", "w": "w"}
    picker.index.apply("a", pb.KVEventBatch(reset=True, block_size=BS, prefix_keys=keys))
    picker.index.apply("b", pb.KVEventBatch(reset=True, block_size=BS, prefix_keys=keys, shares_from={"w": "v"},
                                            stored=hashes(PROMPT, "v")))
    assert picker.index.held("b", "w", PROMPT) == (8, 8) and picker.index.held("b", "x", PROMPT) == (0, 8)
    assert picker.pick(cands(load_b=1), "w", PROMPT).order[0].name == "b"
    picker.index.apply("b", pb.KVEventBatch(reset=True, block_size=BS, prefix_keys=keys, stored=hashes(PROMPT, "v")))
    assert picker.index.held("b", "w", PROMPT) == (0, 8)  # no sharing declared there: v's blocks do not count
