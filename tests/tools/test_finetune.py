"""`kvfleet model finetune` on the tiny model: training lowers perplexity, and what it writes is what
users bring (a PEFT adapter peft loads, an HF directory transformers loads) and what the engine serves."""

from __future__ import annotations

import json

import pytest
import torch
from kvfleet.dataplane.config import AdapterConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.tiny import write_tiny_llama

from kvfleet.tools.finetune import Recipe, corpus_text, train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXT = "\n".join(f"{a}+{b}={a + b}" for a in range(10, 60) for b in range(10, 14))  # the arith task, small
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_lowers_perplexity_and_the_engine_serves_the_result(kind, tmp_path) -> None:
    base = write_tiny_llama(tmp_path / "base", seed=0)
    recipe = Recipe(f"t-{kind}", kind, "arith", steps=12, batch=4, seq_len=24, lr=1e-2 if kind == "lora" else 3e-3,
                    rank=4, alpha=8.0)
    out = tmp_path / "out"
    record = train(recipe, base, out, TEXT)
    assert record["perplexity_after"] < 0.8 * record["perplexity_before"], record
    prompt = [0, 50, 51, 52, 53, 54]
    if kind == "lora":
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
        ref = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
        cfg = EngineConfig(model_dir=str(base), variant="base", dtype="float32", num_kv_blocks=64,
                           adapters=(AdapterConfig("t", str(out)),))
    else:
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        assert not (out / "tokenizer.json").exists()  # the base's tokenizer serves
        ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        cfg = EngineConfig(model_dir=str(base), variant="t", fine_tune_dir=str(out), dtype="float32",
                           num_kv_blocks=64)
    engine = LLMEngine.from_config(cfg)
    assert engine.generate([prompt], GREEDY, variant="t")[0].new_token_ids == _greedy(ref, prompt, 8)


def test_corpora_are_deterministic_and_distinct() -> None:
    texts = {c: corpus_text(c) for c in ("bible", "python", "arith")}
    assert texts == {c: corpus_text(c) for c in texts}
    assert texts["bible"].startswith("Genesis 1:1 In the beginning God created")
    assert "def " in texts["python"] and "=" in texts["arith"].splitlines()[0]
