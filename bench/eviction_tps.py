"""Decode tok/s of the paged engine on the tiny model with and without token eviction.

    PYTHONSAFEPATH=1 .venv/bin/python bench/eviction_tps.py [--policies none streaming-llm h2o]

Runs B prompts of P tokens to N greedy tokens each (budget well below P + N, so the
sequences sit at the budget for most of the run) and prints tokens/s and compactions.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
from kvfleet.dataplane.config import CachePolicyConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", nargs="+", default=["none", "streaming-llm", "keydiff"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    d = write_tiny_llama(tempfile.mkdtemp(), seed=0)
    model, mc = load_model(str(d), dtype=torch.float32, device="cpu")
    rng = random.Random(0)
    prompts = [[rng.randrange(4, mc.vocab_size) for _ in range(a.prompt_len)] for _ in range(a.batch)]
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    for policy in a.policies:
        cp = CachePolicyConfig() if policy == "none" else CachePolicyConfig(
            eviction=policy, eviction_budget_tokens=a.budget, eviction_window_tokens=16, eviction_sink_tokens=4,
            observation_window=16)
        best = 0.0
        for _ in range(a.repeats):
            eng = LLMEngine(model, mc, EngineConfig(model_dir=str(d), block_size=a.block_size, num_kv_blocks=256,
                                                    max_num_seqs=a.batch, cache_policy=cp))
            t0 = time.perf_counter()
            outs = eng.generate(prompts, sp)
            dt = time.perf_counter() - t0
            best = max(best, sum(len(o.new_token_ids) for o in outs) / dt)
        st = eng.eviction_stats()
        print(f"{policy:14s} {best:8.1f} tok/s  compactions={st.compactions} evicted={st.tokens_evicted}")


if __name__ == "__main__":
    main()
