"""The analytic model `make bench-disagg` prints (pure arithmetic; the benchmark itself is not run here)."""

from __future__ import annotations

import pytest

from bench.disaggregated import MODELS, analytic, kv_bytes_per_token, prefill_flops_per_token


def test_kv_bytes_per_token_follow_the_formula():
    smol, llama = MODELS["SmolLM2-135M"], MODELS["Llama-3-8B"]
    assert kv_bytes_per_token(smol, 16) == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(smol, 32) == 46080  # what the fp32 cache moves, as measured
    assert kv_bytes_per_token(llama, 16) == 131072 and kv_bytes_per_token(llama, 4) == 32768
    assert kv_bytes_per_token(llama, 8, overhead=1.1875) == pytest.approx(77824)


def test_ratio_is_link_time_over_compute_time():
    row = next(r for r in analytic({}, 2048, (0.4,)) if r["model"] == "Llama-3-8B" and r["codec"] == "fp16")
    compute_us = prefill_flops_per_token(MODELS["Llama-3-8B"], 2048) / (0.4 * 989e12) * 1e6
    assert row["prefill_us_per_token"] == pytest.approx(compute_us)
    assert row["transfer_us_100g"] == pytest.approx(131072 * 8 / 100e9 * 1e6)
    assert row["ratio_400g"] == pytest.approx(row["ratio_100g"] / 4)
