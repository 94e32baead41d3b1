"""Per-step cost models of one engine pod, and the SLO classes each profile is judged by.

One engine step (chunked prefill + continuous batching, as kvfleet's engine does) costs

    step_s = base + per_seq * running_seqs + per_ctx_token * context_tokens_read + per_prefill_token * chunk

`h100-8b` comes from the ceilings in docs/techniques (a Llama-3-8B in bf16 on an
H100 SXM): decode reads the weights (16.06 GB) and every running sequence's KV
(2 x 32 layers x 8 KV heads x 128 x 2 B = 128 KiB per token) at 75% of 3.35 TB/s;
prefill costs 2 x 8.03 GFLOP per token at 50% of 989 TFLOP/s; 3 ms of scheduler
and launch overhead per step; KV room is what is left of 80 GB after weights and
activations at 90% memory use. The model load is 90 s (image cached, weights
from local NVMe, CUDA graphs) -- an assumption, not a measurement.

`cpu-smollm2` is fitted to the engine's own measurements on this repository's
2-core VM (bench/results/engine_online.md: SmolLM2-135M, float32, 1 thread):
TPOT p50 50 / 95 / 213 ms at 1 / 4 / 16 streaming clients and TTFT p50 410 ms
for ~136-token prompts give base 42 ms, 7 ms per running sequence and 2.6 ms per
prefill token (the clients' prefills interleave ~7.5 and ~30 prefill tokens per
decode step at 4 and 16 clients). Load time 20 s is an assumption.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float
    target: float  # attainmentTarget
    critical: bool  # not sheddable


@dataclass(frozen=True)
class Profile:
    name: str
    base_s: float
    per_seq_s: float
    per_ctx_token_s: float
    per_prefill_token_s: float
    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    startup_s: float
    classes: dict[str, SLO]
    note: str

    def step_s(self, seqs: int, ctx_tokens: float, prefill_tokens: int) -> float:
        return (self.base_s + self.per_seq_s * seqs + self.per_ctx_token_s * ctx_tokens
                + self.per_prefill_token_s * prefill_tokens)


_HBM = 3.35e12 * 0.75
_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2

H100_8B = Profile(
    name="h100-8b",
    base_s=16.06e9 / _HBM + 0.003,
    per_seq_s=0.00005,
    per_ctx_token_s=_KV_PER_TOKEN / _HBM,
    per_prefill_token_s=2 * 8.03e9 / (989e12 * 0.5),
    kv_capacity_tokens=int((80e9 * 0.9 - 16.06e9 - 4e9) / _KV_PER_TOKEN),
    max_num_seqs=256,
    max_num_batched_tokens=2048,
    startup_s=90.0,
    classes={
        "interactive": SLO(ttft_ms=1000, tpot_ms=100, target=0.99, critical=True),
        "batch": SLO(ttft_ms=15000, tpot_ms=150, target=0.90, critical=False),
    },
    note="Llama-3-8B bf16 on H100 SXM from bandwidth/FLOP ceilings (75% HBM, 50% MFU), 90 s model load",
)

CPU_SMOLLM2 = Profile(
    name="cpu-smollm2",
    base_s=0.042,
    per_seq_s=0.007,
    per_ctx_token_s=0.0,
    per_prefill_token_s=0.0026,
    kv_capacity_tokens=65536,
    max_num_seqs=64,
    max_num_batched_tokens=2048,
    startup_s=20.0,
    classes={
        "interactive": SLO(ttft_ms=8000, tpot_ms=300, target=0.99, critical=True),
        "batch": SLO(ttft_ms=60000, tpot_ms=800, target=0.90, critical=False),
    },
    note="SmolLM2-135M fp32 on 1 CPU thread, fitted to bench/results/engine_online.md, 20 s model load",
)

PROFILES = {p.name: p for p in (H100_8B, CPU_SMOLLM2)}
