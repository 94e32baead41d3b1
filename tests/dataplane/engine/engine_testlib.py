"""Engine test helpers: engines over a loaded model, seeded prompts, and the one-sequence greedy
references (dense attention, or `PolicyAttention` = the evaluator's cache) the paged engine must match."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import torch
from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.kvcache.policy import PolicyAttention, PolicySpec
from kvfleet.dataplane.model.attention import AttentionBackend, DenseAttention


def make_engine(model: Any, mc: Any, cp: CachePolicyConfig | None = None, **kw: Any) -> LLMEngine:
    """An engine over an already loaded model (block_size 4 and 128 blocks unless given)."""
    cfg = EngineConfig(model_dir="unused", **{"block_size": 4, "num_kv_blocks": 128,
                                              "cache_policy": cp or CachePolicyConfig(), **kw})
    return LLMEngine(model, mc, cfg)


def random_prompt(vocab_size: int, n: int, seed: int = 0, low: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(low, vocab_size) for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def greedy_through(model: Any, attn: AttentionBackend, prompt: list[int], n: int,
                   chunk: int | None = None) -> list[int]:
    """Greedy decoding of one sequence through `attn`, no eos stop; the prompt fed in pieces of `chunk`."""
    out: list[int] = []
    chunk = chunk or len(prompt)
    with torch.inference_mode():
        for s in range(0, len(prompt), chunk):
            hidden = model.forward(torch.tensor(prompt[s:s + chunk]), torch.arange(s, min(s + chunk, len(prompt))),
                                   attn)
        for i in range(n):
            tok = int(model.compute_logits(hidden[-1:]).argmax(-1))
            out.append(tok)
            if i + 1 < n:
                hidden = model.forward(torch.tensor([tok]), torch.tensor([len(prompt) + i]), attn)
    return out


def dense_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the dense backend, one sequence at a time, no eos stop."""
    return greedy_through(model, DenseAttention(), prompt, n)


def policy_attention(model: Any, mc: Any, cp: CachePolicyConfig, slack: int = 0) -> PolicyAttention:
    """The evaluator's cache for one sequence under `cp`; `slack` = the engine's eviction hysteresis."""
    spec = PolicySpec.from_config(cp)
    if spec.eviction.enabled:
        spec = replace(spec, eviction=replace(spec.eviction, slack_tokens=slack))
    return PolicyAttention(spec, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                           rope=lambda p: model.rotary.cos_sin(p, torch.float32))
