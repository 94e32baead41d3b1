"""The engine benchmark keeps running (tiny shapes, a few steps)."""

from __future__ import annotations

from kvfleet.tools import engine_bench as bench


def test_bench_runs_on_tiny(capsys):
    bench.main(["--shape", "tiny", "--batch", "1", "3", "--prompt-len", "8", "--max-tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "batch=  3" in out and "decode_tok/s=" in out and "engine_overhead=" in out


def test_bench_overhead_mode(capsys):
    bench.main(["--overhead", "4"])
    assert "running=   4" in capsys.readouterr().out
