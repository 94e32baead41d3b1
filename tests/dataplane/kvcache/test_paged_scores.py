"""kvcache/paged_scores.py: per-slot H2O scores and SnapKV windows, on crafted paged inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvfleet.dataplane.engine.api import GenerationRequest
from kvfleet.dataplane.engine.sequence import Sequence
from kvfleet.dataplane.kvcache.blocks import BlockManager
from kvfleet.dataplane.kvcache.eviction import EvictionSpec, attention_probs, received_attention
from kvfleet.dataplane.kvcache.paged import (
    PagedAttention,
    PagedKVCache,
    PagedMetadata,
    PrefillBatch,
    PrefillChunk,
)
from kvfleet.dataplane.kvcache.paged_eviction import PagedEvictor
from kvfleet.dataplane.kvcache.paged_scores import PagedScores

L, NB, BS, HKV, HQ, D = 2, 16, 4, 2, 4, 8
H2O = EvictionSpec("h2o", budget_tokens=12, window_tokens=2, sink_tokens=1)


def _cache(seed=0) -> PagedKVCache:
    g = torch.Generator().manual_seed(seed)
    kv = PagedKVCache(L, NB, BS, HKV, D, torch.float32, "cpu")
    for t in kv.k + kv.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return kv


def _grid(table: list[int]) -> torch.Tensor:
    return (torch.tensor(table)[:, None] * BS + torch.arange(BS)).flatten()  # [M * bs]


def _ref(kv, layer, table, n, q, q_pos) -> torch.Tensor:
    """received_attention over attention_probs of queries q [T, Hq, D] at q_pos [T] on the first n slots -> [n]."""
    k = kv.k[layer].view(-1, HKV, D)[_grid(table)[:n]]
    visible = (torch.arange(n)[None, :] <= q_pos[:, None])[None]  # [1, T, n]
    return received_attention(attention_probs(q, k, visible), HKV).sum(1)


def test_decode_scores_equal_received_attention_and_output_equals_sdpa():
    kv, tables, lens = _cache(), [[3, 7, 1], [5, 2]], [11, 6]  # two sequences, context after the step
    sc = PagedScores(H2O, NB * BS, BS, L, "cpu")
    sc.acc.fill_(123.0)  # stale scores of earlier owners
    bt = torch.tensor([[3, 7, 1], [5, 2, 0]])
    mask = (torch.arange(3 * BS)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    new_slots = torch.stack([_grid(t)[n - 1] for t, n in zip(tables, lens, strict=True)])
    meta = PagedMetadata(new_slots, 2, bt, mask, [])
    meta.scores = sc.plan([], meta)
    assert sc.acc[new_slots].eq(0).all()  # a slot written this step starts at 0
    before = sc.acc.clone()
    attn = PagedAttention(kv)
    attn.set_metadata(meta)
    g = torch.Generator().manual_seed(1)
    want = [torch.zeros(n) for n in lens]
    for layer in range(L):
        q, k, v = (torch.randn(2, h, D, generator=g) for h in (HQ, HKV, HKV))
        out = attn.attend(layer, q, k, v)  # stores k/v at new_slots, explicit softmax
        step, meta.scores = meta.scores, None  # the same attention through fused SDPA
        torch.testing.assert_close(out, attn._decode(layer, q, k, v, meta))
        meta.scores = step
        for b, (t, n) in enumerate(zip(tables, lens, strict=True)):
            want[b] += _ref(kv, layer, t, n, q[b:b + 1], torch.tensor([n - 1]))
    for t, n, w in zip(tables, lens, want, strict=True):
        torch.testing.assert_close(sc.acc[_grid(t)[:n]] - before[_grid(t)[:n]], w)
    used = torch.cat([_grid(t)[:n] for t, n in zip(tables, lens, strict=True)])
    others = torch.ones(NB * BS, dtype=torch.bool)
    others[used] = False
    assert sc.acc[others].eq(123.0).all()  # padding columns and other sequences' slots untouched


def test_prefill_scores_equal_received_attention_loop_and_batched():
    tables, ctx, qlen = [[6, 1, 9], [4, 12]], [10, 7], [3, 7]  # chunk 1 has cached context, chunk 2 none
    starts = [c - n for c, n in zip(ctx, qlen, strict=True)]
    slot_map = torch.cat([_grid(t)[s:c] for t, s, c in zip(tables, starts, ctx, strict=True)])
    g = torch.Generator().manual_seed(2)
    qkv = [[torch.randn(sum(qlen), h, D, generator=g) for h in (HQ, HKV, HKV)] for _ in range(L)]
    results = []
    for batched in (False, True):
        kv = _cache(seed=3)
        sc = PagedScores(H2O, NB * BS, BS, L, "cpu")
        chunks = [PrefillChunk(0, 3, 10, torch.tensor(tables[0])), PrefillChunk(3, 7, 7, None)]
        pb = None
        if batched:
            lq = max(qlen)
            i = torch.minimum(torch.arange(lq)[None, :], torch.tensor(qlen)[:, None] - 1)
            q_index = torch.tensor([0, 3])[:, None] + i
            limit = torch.tensor(starts)[:, None] + i
            pb = PrefillBatch(q_index, torch.tensor([[6, 1, 9], [4, 12, 0]]),
                              (torch.arange(3 * BS)[None, None, :] <= limit[:, :, None])[:, None],
                              torch.tensor([0, 1, 2, 7, 8, 9, 10, 11, 12, 13]))
        meta = PagedMetadata(slot_map, 0, None, None, chunks, pb)
        meta.scores = sc.plan([], meta)
        attn = PagedAttention(kv)
        attn.set_metadata(meta)
        outs = [attn.attend(layer, *qkv[layer]) for layer in range(L)]
        results.append((outs, sc.acc.clone()))
        want = torch.zeros(NB * BS)
        for layer in range(L):
            q = qkv[layer][0]
            for t, s, c, o, n in zip(tables, starts, ctx, (0, 3), qlen, strict=True):
                want[_grid(t)[:c]] += _ref(kv, layer, t, c, q[o:o + n], torch.arange(s, c))
        torch.testing.assert_close(sc.acc, want)
        meta.scores = None  # the fused path gives the same attention output
        for layer in range(L):
            torch.testing.assert_close(outs[layer], attn.attend(layer, *qkv[layer]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1])


def _seq(bm: BlockManager, n: int, sid="s") -> Sequence:
    seq = Sequence(GenerationRequest(sid, list(range(1, n + 1))))
    assert bm.allocate(seq.block_table, n)
    seq.num_computed_tokens = n
    return seq


def test_h2o_keeps_heavy_hitters_and_scores_move_with_compaction():
    kv, bm = _cache(), BlockManager(NB, BS, enable_prefix_caching=False)
    ev = PagedEvictor(H2O, kv, bm)  # budget 12, slack 4: over 12 -> keep 8 = 1 sink + 2 window + 5 hitters
    seq = _seq(bm, 14)
    slots = ev._slots(seq, torch.arange(14))
    heavy = [2, 5, 6, 9, 10]
    ev.scores.acc[slots] = torch.arange(14, dtype=torch.float32) * 0.01  # later = slightly more
    ev.scores.acc[slots[heavy]] += 1.0
    ev.scores.acc[slots[11]] = 0.5  # 6th best: dropped
    keys = ev.keys(seq, 14)
    acc = ev.scores.acc[slots].clone()
    free0 = bm.num_free_blocks
    assert ev.maybe_compact(seq) == 2  # 14 -> 8 slots: 4 blocks -> 2
    want = [0] + heavy + [12, 13]
    assert seq.kept_positions == want and seq.num_kv_slots == 8 and bm.num_free_blocks == free0 + 2
    torch.testing.assert_close(ev.scores.acc[ev._slots(seq, torch.arange(8))], acc[want], rtol=0, atol=0)
    for layer, k in enumerate(ev.keys(seq, 8)):
        torch.testing.assert_close(k, keys[layer][want], rtol=0, atol=0)
    bm.free(seq.block_table)
    assert bm.num_free_blocks == NB


def test_snapkv_keeps_the_pooled_votes_of_the_window():
    kv, bm = PagedKVCache(L, NB, BS, HKV, D, torch.float32, "cpu"), BlockManager(NB, BS, False)
    spec = EvictionSpec("snapkv", budget_tokens=11, window_tokens=2, sink_tokens=1, observation_window=3,
                        pooling_kernel=3)
    ev = PagedEvictor(spec, kv, bm, slack_tokens=2)  # over 11 -> keep 9 = 1 sink + 2 window + 6 voted
    seq = _seq(bm, 16)
    hot = F.normalize(torch.ones(D), dim=0) * 8
    for layer in range(L):  # every key 0 except two hot ones: the window queries look at them
        k = torch.zeros(16, HKV, D)
        k[4], k[10, 1] = hot, hot  # slot 10 only in kv head 1: aggregation over heads still sees it
        kv.store(layer, ev._slots(seq, torch.arange(16)), k, torch.zeros(16, HKV, D))
    ev.scores.windows["s"] = (hot.expand(L, 3, HQ, D).clone(), torch.tensor([13, 14, 15]))
    seq.num_prompt_tokens = 17  # mid-prompt: snapkv waits for the whole prompt
    assert ev.choose(seq) is None
    seq.num_prompt_tokens = 16
    ev.maybe_compact(seq)
    assert seq.kept_positions == [0, 3, 4, 5, 9, 10, 11, 14, 15]  # sink, 4 and 10 with pooled neighbours, window


def test_snapkv_window_keeps_the_last_queries_and_replaces_recomputed_ones():
    spec = EvictionSpec("snapkv", budget_tokens=10, window_tokens=2, sink_tokens=1, observation_window=3)
    sc = PagedScores(spec, 0, BS, 1, "cpu")

    class It:  # a ScheduledSeq's fields plan reads
        def __init__(self, sid, start, n):
            self.seq, self.start, self.num_new_tokens = Sequence(GenerationRequest(sid, [1])), start, n

    def step(items, rows):
        meta = PagedMetadata(torch.zeros(rows, dtype=torch.long), 0, None, None, [])
        st = sc.plan(items, meta)
        st.observe(0, torch.arange(rows, dtype=torch.float32)[:, None, None].expand(rows, 1, 2))
        sc.flush()

    step([It("a", 0, 5), It("b", 0, 2)], 7)  # a: rows 0-4 (keeps 2-4), b: rows 5-6
    step([It("b", 2, 1), It("a", 5, 1)], 2)
    qa, pa = sc.window("a")
    assert pa.tolist() == [3, 4, 5] and qa[0, :, 0, 0].tolist() == [3.0, 4.0, 1.0]
    assert sc.window("b")[1].tolist() == [0, 1, 2]
    step([It("a", 2, 2)], 2)  # a preempted and recomputing from position 2: newer entries go
    qa, pa = sc.window("a")
    assert pa.tolist() == [2, 3] and qa[0, :, 0, 0].tolist() == [0.0, 1.0]
    sc.release("a")
    assert "a" not in sc.windows
