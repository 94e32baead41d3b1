"""The real fine-tunes of SmolLM2-135M (`kvfleet model finetune`, cached) through the engine, against
peft / transformers: greedy, fp32, token for token. Slow: trains on first use (about 1.5 min each)."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.config import AdapterConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow

PROMPT = "And God said unto Noah,"
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _recipe(name: str):
    from kvfleet.tools.finetune import RECIPES, finetune_dir

    return finetune_dir(next(r for r in RECIPES if r.name == name))


def test_trained_adapter_and_full_fine_tune_equal_the_references(smollm2_dir) -> None:
    lora, full = _recipe("bible-lora"), _recipe("bible-full")
    prompt = Tokenizer.from_dir(smollm2_dir).encode(PROMPT)
    engine = LLMEngine.from_config(EngineConfig(model_dir=str(smollm2_dir), variant="base", dtype="float32",
                                                num_kv_blocks=64, adapters=(AdapterConfig("bible", str(lora)),)))
    base_out = engine.generate([prompt], GREEDY, variant="base")[0].new_token_ids
    lora_out = engine.generate([prompt], GREEDY, variant="bible")[0].new_token_ids
    ref = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), lora).eval()
    assert lora_out == _greedy(ref, prompt, 16)
    ft_engine = LLMEngine.from_config(EngineConfig(model_dir=str(smollm2_dir), variant="bible-full",
                                                   fine_tune_dir=str(full), dtype="float32", num_kv_blocks=64))
    full_out = ft_engine.generate([prompt], GREEDY)[0].new_token_ids
    ref_full = transformers.AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    assert full_out == _greedy(ref_full, prompt, 16)
    assert base_out != lora_out and base_out != full_out
