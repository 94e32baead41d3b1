"""The fleet simulator's mechanics: traces, determinism, pods that load and drain, the calibration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from kvfleet.operator.api.fleet import Autoscaling

from kvfleet.simulate.cli import main
from kvfleet.simulate.controllers import HPA, KvfleetPlanner
from kvfleet.simulate.fleet import Fleet
from kvfleet.simulate.profiles import CPU_SMOLLM2, H100_8B
from kvfleet.simulate.run import Simulation
from kvfleet.simulate.trace import (
    HEADER,
    Request,
    SampleShape,
    TraceError,
    read_trace,
    sample_trace,
    write_trace,
)

SMALL = SampleShape(duration_s=300.0, interactive_rps=6.0, batch_rps=1.5, bursts=1, burst_s=120.0)


def test_the_sample_trace_is_reproducible_and_bursty(tmp_path):
    a, b = sample_trace(7, SMALL), sample_trace(7, SMALL)
    assert a == b and a != sample_trace(8, SMALL)
    assert {r.slo_class for r in a} == {"interactive", "batch"}
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:], strict=False))
    path = tmp_path / "t.csv"
    write_trace(path, a)
    assert path.read_text().splitlines()[0] == ",".join(HEADER)
    assert read_trace(path) == a
    per_s = [0] * 300
    for r in sample_trace(0, dataclasses.replace(SMALL, duration_s=300.0)):
        if r.slo_class == "interactive":
            per_s[int(r.arrival_s)] += 1
    assert max(sum(per_s[i:i + 30]) for i in range(270)) > 1.5 * min(sum(per_s[i:i + 30]) for i in range(270))


@pytest.mark.parametrize("body, message", [
    ("", "empty file; expected the header arrival_s,slo_class"),
    ("arrival,slo_class,variant,shared_prefix,prompt_tokens,output_tokens\n", ":1: header is"),
    (",".join(HEADER) + "\n", "no requests after the header"),
    (",".join(HEADER) + "\n0.5,chat,m,none,10\n", ":2: 5 fields; expected 6"),
    (",".join(HEADER) + "\nsoon,chat,m,none,10,5\n", ":2: arrival_s 'soon' is not a number"),
    (",".join(HEADER) + "\n0.5,chat,m,none,ten,5\n", ":2: prompt_tokens 'ten' is not an integer"),
    (",".join(HEADER) + "\n0.5,chat,m,none,10,0\n", ":2: output_tokens '0' must be >= 1"),
    (",".join(HEADER) + "\n-1,chat,m,none,10,5\n", ":2: arrival_s '-1' must be >= 0"),
    (",".join(HEADER) + "\n0.5,chat,m,,10,5\n", ":2: shared_prefix is empty (write 'none')"),
    (",".join(HEADER) + "\n2,chat,m,none,10,5\n\n1,chat,m,none,10,5\n", ":4: arrival_s 1.0 is before the previous"),
])
def test_trace_errors_name_the_line_and_the_field(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(TraceError, match=None) as err:
        read_trace(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_the_command_reports_a_bad_trace_clearly(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(",".join(HEADER) + "\n0.5,chat,m,none,10\n")
    assert main(["--trace", str(path)]) == 2
    assert f"kvfleet simulate: {path}:2: 5 fields" in capsys.readouterr().err
    assert main(["--trace", str(tmp_path / "missing.csv")]) == 2
    assert "cannot read the trace" in capsys.readouterr().err


def test_an_unknown_slo_class_is_refused(tmp_path, capsys):
    path = tmp_path / "t.csv"
    write_trace(path, [Request(0.0, "gold", "m", None, 10, 5)])
    assert main(["--trace", str(path)]) == 2
    assert "SLO classes ['gold']" in capsys.readouterr().err


def _run(seed: int, controller=None, reqs=None):
    reqs = reqs or sample_trace(seed, SMALL)
    ctrl = controller or KvfleetPlanner(Autoscaling(), 1, 20)
    return Simulation(reqs, H100_8B, ctrl, seed=seed, initial=1, tick_s=0.2, drain_s=30, tail_s=120).run()


def test_a_run_is_deterministic_for_a_seed():
    a, b = _run(3), _run(3)
    assert a == b
    assert a.requests["interactive"] > 1000 and a.gpu_hours > 0


def test_the_command_prints_the_table(tmp_path, capsys):
    trace = tmp_path / "s.csv"
    assert main(["--write-sample", str(trace), "--seed", "1", "--rate-scale", "0.1", "--duration", "200"]) == 0
    assert main(["--trace", str(trace), "--max-replicas", "8", "--record", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    for name in ("| kvfleet |", "| hpa-gpu-util |", "| keda-queue |", "interactive attainment", "GPU-hours"):
        assert name in out
    assert "kvfleet" in (tmp_path / "r.md").read_text() and (tmp_path / "r.json").exists()


def _fleet(profile=H100_8B) -> Fleet:
    return Fleet(profile, {}, seed=0, tick_s=0.1, drain_s=30.0)


def test_a_new_pod_serves_only_after_its_model_load():
    fleet = _fleet()
    fleet.scale("m", 1, 0.0)
    fleet.arrive(Request(0.0, "interactive", "m", None, 100, 10), True, 0.0)
    t = 0.0
    while not fleet.done:
        fleet.tick(t)
        t += 0.1
    job = fleet.done[0]
    assert job.first_token_s is not None and job.first_token_s >= H100_8B.startup_s
    assert fleet.gpu_s >= H100_8B.startup_s  # the load costs GPU time


def test_scale_down_drains_and_cuts_what_outlives_the_grace_period():
    fleet = _fleet()
    fleet.scale("m", 1, -H100_8B.startup_s)
    fleet.tick(0.0)
    fleet.arrive(Request(0.0, "interactive", "m", None, 100, 50), True, 0.0)  # ~1 s of decode
    fleet.arrive(Request(0.0, "batch", "m", None, 100, 100000), False, 0.0)  # outlives the drain
    fleet.tick(0.1)
    fleet.scale("m", 0, 0.2)
    assert fleet.desired("m") == 0 and fleet.pods["m"][0].state == "draining"
    t = 0.2
    while fleet.pods["m"]:
        fleet.tick(t)
        t += 0.1
    assert 30.0 <= t <= 30.5
    short, long_ = sorted(fleet.done, key=lambda j: j.req.output_tokens)
    assert not short.missed and long_.missed


def test_a_critical_request_preempts_a_sheddable_one_when_kv_is_full():
    profile = dataclasses.replace(H100_8B, kv_capacity_tokens=1000)
    fleet = _fleet(profile)
    fleet.scale("m", 1, -profile.startup_s)
    fleet.tick(0.0)
    fleet.arrive(Request(0.1, "batch", "m", None, 500, 400), False, 0.1)
    fleet.tick(0.1)
    fleet.tick(0.2)
    assert fleet.pods["m"][0].running  # the batch request decodes
    fleet.arrive(Request(0.3, "interactive", "m", None, 500, 10), True, 0.3)
    for i in range(3, 40):
        fleet.tick(0.1 * i)
    assert fleet.preemptions == 1
    assert [j.req.slo_class for j in fleet.done][0] == "interactive"


def test_the_cpu_profile_matches_the_engine_measurements():
    """bench/results/engine_online.md: TPOT p50 50 ms alone, TTFT ~410 ms for ~136 prompt tokens."""
    fleet = _fleet(CPU_SMOLLM2)
    fleet.scale("m", 1, -CPU_SMOLLM2.startup_s)
    fleet.arrive(Request(0.0, "interactive", "m", None, 136, 65), True, 0.0)
    t = 0.0
    while not fleet.done:
        fleet.tick(t)
        t += 0.1
    job = fleet.done[0]
    assert job.first_token_s is not None and job.finish_s is not None
    assert 0.3 <= job.first_token_s <= 0.5
    assert 0.045 <= (job.finish_s - job.first_token_s) / 64 <= 0.055


def test_hpa_waits_its_stabilisation_window_before_scaling_down():
    class V:
        now = 0.0

        def desired(self, v):
            return 10

        def ready(self, v):
            return 10

        def gpu_util(self, v, w):
            return 0.1

    hpa, view = HPA("h", "gpu_util", 0.7, 1, 20), V()
    seen = []
    for i in range(25):
        view.now = 15.0 * i
        seen.append(hpa.decide(view, ["m"])["m"])  # type: ignore[arg-type]
    assert seen[19] == 10 and seen[21] == 2


def test_the_simulator_is_a_tool_the_library_does_not_import():
    root = Path(__file__).resolve().parents[2]
    for pkg in ("operator", "dataplane"):
        for f in (root / pkg).rglob("*.py"):
            assert "kvfleet.simulate" not in f.read_text(), f


def test_the_simulator_runs_without_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from kvfleet.cli import main\n"
            f"raise SystemExit(main(['simulate', '--write-sample', {str(tmp_path / 's.csv')!r}, '--duration', '20']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "wrote" in result.stdout, result.stderr


def test_a_step_longer_than_a_tick_keeps_the_pod_busy_through_it():
    """GPU utilisation (what the HPA reads) must not drop to 0 between the ticks of one long step."""
    fleet = _fleet(CPU_SMOLLM2)  # a 2048-token prefill chunk takes ~5.4 s here
    fleet.scale("m", 1, -CPU_SMOLLM2.startup_s)
    fleet.tick(0.0)
    fleet.arrive(Request(0.1, "interactive", "m", None, 3000, 5), True, 0.1)
    pod = fleet.pods["m"][0]
    busy = []
    for i in range(1, 40):
        pod.busy_s = 0.0
        fleet.tick(0.1 * i)
        busy.append(round(pod.busy_s, 6))
    assert busy == [0.1] * 39
