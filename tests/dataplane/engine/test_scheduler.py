"""Scheduler: chunked prefill budget, decode first, slack/priority order, aging, preemption."""

import subprocess
import sys

from kvfleet.dataplane.engine.api import GenerationRequest
from kvfleet.dataplane.engine.scheduler import Scheduler
from kvfleet.dataplane.engine.sequence import SeqStatus, Sequence
from kvfleet.dataplane.kvcache.blocks import BlockManager

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _sched(num_blocks=64, max_seqs=8, budget=32, clock=None, starvation_s=10.0):
    return Scheduler(BlockManager(num_blocks, BS), max_seqs, budget, starvation_s, clock or Clock())


def _seq(rid, n, arrival=100.0, priority=0, ttft=float("inf"), tpot=float("inf"), base=0):
    req = GenerationRequest(rid, [base + i for i in range(n)], arrival_time=arrival)
    return Sequence(req, priority=priority, ttft_s=ttft, tpot_s=tpot)


def _step(s: Scheduler, sample_token=7):
    """schedule + fake run + commit; sampled sequences get one more token."""
    out = s.schedule()
    s.commit(out)
    for item in out.scheduled:
        if item.sample:
            item.seq.token_ids.append(sample_token)
            item.seq.last_token_time = s.clock()
    s.bm.check_invariants()
    return out


def _plan(out):
    return [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled]


def test_chunked_prefill_respects_budget():
    s = _sched(budget=8)
    s.add(_seq("a", 20))
    s.add(_seq("b", 3))
    out = _step(s)
    assert _plan(out) == [("a", 8)] and out.num_batched_tokens == 8 and not out.scheduled[0].sample
    assert _plan(_step(s)) == [("a", 8)]
    out = _step(s)  # a finishes its prompt (4) and samples; b gets the remaining budget
    assert _plan(out) == [("a", 4), ("b", 3)]
    assert all(i.sample for i in out.scheduled)
    assert _plan(_step(s)) == [("a", 1), ("b", 1)]  # decodes


def test_decode_first_then_prefill_chunks():
    s = _sched(budget=6)
    s.add(_seq("a", 4))
    _step(s)  # a prefilled, now decoding
    s.add(_seq("b", 10))
    out = _step(s)
    assert _plan(out) == [("a", 1), ("b", 5)]


def test_waiting_ordered_by_least_ttft_slack_then_priority():
    clock = Clock()
    s = _sched(budget=100, clock=clock)
    s.add(_seq("lax", 4, ttft=5.0))
    s.add(_seq("tight", 4, ttft=0.5))
    s.add(_seq("best_effort_lo", 4, priority=0))
    s.add(_seq("best_effort_hi", 4, priority=3))
    out = s.schedule()
    assert [i.seq.seq_id for i in out.scheduled] == ["tight", "lax", "best_effort_hi", "best_effort_lo"]


def test_running_ordered_by_tpot_slack_when_budget_is_short():
    clock = Clock()
    s = _sched(budget=100, clock=clock)
    s.add(_seq("a", 4, tpot=1.0))
    s.add(_seq("b", 4, tpot=0.1))
    _step(s)
    s.max_num_batched_tokens = 1  # only one decode fits
    assert _plan(_step(s)) == [("b", 1)]


def test_starvation_protection_ages_best_effort_work():
    clock = Clock()
    s = _sched(budget=4, max_seqs=1, clock=clock, starvation_s=10.0)
    s.add(_seq("old", 4, arrival=100.0))  # no deadline: infinite slack
    clock.t = 105.0
    s.add(_seq("slo", 4, arrival=105.0, ttft=2.0))
    assert _plan(s.schedule()) == [("slo", 4)]
    s2 = _sched(budget=4, max_seqs=1, clock=clock, starvation_s=10.0)
    s2.add(_seq("old", 4, arrival=100.0))
    clock.t = 111.0  # old has waited 11 s > starvation_s
    s2.add(_seq("slo", 4, arrival=111.0, ttft=2.0))
    assert _plan(s2.schedule()) == [("old", 4)]


def test_max_num_seqs_limits_running():
    s = _sched(max_seqs=2, budget=100)
    for r in "abc":
        s.add(_seq(r, 4))
    out = _step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_preemption_when_blocks_run_out_picks_lowest_priority():
    # 4 blocks of 4 slots; two sequences of 7 tokens use 2 blocks each
    s = _sched(num_blocks=4, budget=100)
    s.add(_seq("hi", 7, priority=5))
    s.add(_seq("lo", 7, priority=0, base=100))
    out = _step(s)  # both prefill and sample -> 8 tokens each, blocks full
    assert len(out.scheduled) == 2 and s.bm.num_free_blocks == 0
    assert _step(s).preempted == []  # token 8 still fits in 2 blocks
    out = _step(s)  # token 9 needs a 3rd block for both: lo is preempted
    assert out.preempted == ["lo"]
    assert _plan(out) == [("hi", 1)]
    lo = next(x for x in s.waiting if x.seq_id == "lo")
    assert lo.status is SeqStatus.WAITING and lo.num_computed_tokens == 0 and lo.block_table == []
    assert s.num_preemptions == 1
    # when hi finishes, lo is readmitted and recomputes prompt + generated tokens
    s.finish(s.running[0], "stop")
    out = _step(s)
    assert out.scheduled[0].seq.seq_id == "lo"
    assert out.scheduled[0].start + out.scheduled[0].num_new_tokens == 9  # 7 prompt + 2 generated
    # lo's tail block was evicted to grow hi; its head block comes back from the prefix cache
    assert out.scheduled[0].start == 4
    s.finish(lo, "stop")
    assert s.bm.num_free_blocks == 4


def test_self_preemption_when_alone():
    s = _sched(num_blocks=2, budget=100)
    s.add(_seq("a", 8))
    _step(s)  # 9 tokens, 8 computed, needs 3 blocks next step
    out = s.schedule()
    assert out.preempted == ["a"] and out.scheduled == []


def test_abort_frees_blocks_everywhere():
    s = _sched(budget=4)
    s.add(_seq("a", 10))
    s.add(_seq("b", 10))
    _step(s)
    assert s.abort("a") is not None and s.abort("b") is not None
    assert s.abort("zzz") is None
    out = s.schedule()
    assert out.finished == ["a", "b"] and out.is_empty
    assert s.bm.num_free_blocks == s.bm.num_blocks
    s.bm.check_invariants()


def test_prefix_hits_skip_prefill():
    s = _sched(budget=100)
    s.add(_seq("a", 10))
    _step(s)
    s.add(_seq("b", 10))
    out = _step(s)
    b = next(i for i in out.scheduled if i.seq.seq_id == "b")
    assert b.start == 8 and b.num_new_tokens == 2 and b.seq.num_cached_prompt_tokens == 8


def test_scheduler_imports_no_torch():
    code = "import sys, kvfleet.dataplane.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_higher_priority_waiting_preempts_lower_priority_running_for_blocks():
    s = _sched(num_blocks=4, budget=100)
    s.add(_seq("batch", 13, priority=0))  # 4 blocks once its first token is sampled
    _step(s)
    assert s.bm.num_free_blocks == 0
    s.add(_seq("peer", 4, priority=0, base=50))  # same priority: waits, never preempts
    out = _step(s)
    assert _plan(out) == [("batch", 1)] and out.preempted == []
    s.add(_seq("chat", 4, priority=5, base=90))  # higher priority: takes batch's blocks
    out = _step(s)
    assert out.preempted == ["batch"]
    # batch's decode was dropped from this step (budget refunded); the freed blocks also fit peer
    assert _plan(out) == [("chat", 4), ("peer", 4)]
    assert [x.seq_id for x in s.waiting] == ["batch"]
    assert s.bm.num_used_blocks == 2


def test_higher_priority_waiting_preempts_for_a_seat():
    s = _sched(max_seqs=1, budget=100)
    s.add(_seq("lo", 4, priority=0))
    _step(s)
    s.add(_seq("hi", 4, priority=1, base=20))
    out = _step(s)
    assert out.preempted == ["lo"] and _plan(out) == [("hi", 4)]
    assert [x.seq_id for x in s.running] == ["hi"]
