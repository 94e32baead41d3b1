"""Paged engine on the real SmolLM2-135M vs `transformers` greedy, token for token (slow)."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
smollm2 = pytest.importorskip("kvfleet.dataplane.model.smollm2", reason="SmolLM2 import not available")

MAX_NEW = 16
SHARED = ("You are a helpful assistant. Answer briefly and precisely. The user asks about the history "
          "of the Roman Empire, and you reply with dates and names. ")
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):",
    SHARED + "When did Augustus become emperor?",
    SHARED + "Who was the last emperor of the Western Roman Empire, and when did it fall?",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,",
    SHARED + "Name three emperors.",
]


@pytest.fixture(scope="module")
def smol():
    model_dir = str(smollm2.smollm2_dir())
    from kvfleet.dataplane.model.loader import load_model
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = []
    with torch.inference_mode():
        for p in prompts:
            # NOTE: no min_new_tokens: transformers implements it by masking eos, which
            # changes the argmax; both sides stop at eos instead (and emit it)
            out = ref_model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False,
                                     pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    del ref_model
    model, mc = load_model(model_dir, dtype=torch.float32, device="cpu")
    return model, mc, model_dir, prompts, refs


def _engine(smol, **kw) -> LLMEngine:
    model, mc, model_dir, _, _ = smol
    return LLMEngine(model, mc, EngineConfig(model_dir=model_dir, **{"block_size": 16, "num_kv_blocks": 256, **kw}))


GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def test_one_batch_with_prefix_hits_matches_transformers(smol):
    _, _, _, prompts, refs = smol
    engine = _engine(smol)
    outs = engine.generate(prompts, GREEDY)  # shared-prefix prompts also hit each other after the first
    assert [o.new_token_ids for o in outs] == refs
    again = engine.generate(prompts, GREEDY)  # second round: every long prompt hits the prefix cache
    assert [o.new_token_ids for o in again] == refs
    assert sum(o.num_cached_prompt_tokens for o in again) > 0
    assert engine.scheduler.bm.num_used_blocks == 0


def test_preemption_and_chunking_match_transformers(smol):
    _, _, _, prompts, refs = smol
    engine = _engine(smol, num_kv_blocks=14, max_num_batched_tokens=48)
    outs = engine.generate(prompts, GREEDY)
    assert engine.stats().num_preemptions > 0
    assert [o.new_token_ids for o in outs] == refs
