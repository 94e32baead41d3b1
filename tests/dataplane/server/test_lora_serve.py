"""Variants through the real OpenAI surface: `kvfleet serve` with LoRA adapters, the openai SDK on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest
from kvfleet.dataplane.config import AdapterConfig, EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.tiny import write_random_lora
from kvfleet.dataplane.model.tokenizer import Tokenizer
from process_testlib import serving_process

PROMPT = "The quick brown fox"


def test_each_variant_answers_with_its_own_weights(tiny_dir: Path, tmp_path: Path) -> None:
    adapters = {"support": write_random_lora(tmp_path / "support", tiny_dir, rank=8, alpha=16.0, seed=1),
                "legal": write_random_lora(tmp_path / "legal", tiny_dir, rank=4, alpha=8.0, seed=2,
                                           target_modules=("q_proj", "v_proj", "down_proj"))}
    # what each variant answers, straight from the engine
    tok = Tokenizer.from_dir(tiny_dir)
    engine = LLMEngine.from_config(EngineConfig(
        model_dir=str(tiny_dir), variant="tiny", dtype="float32", num_kv_blocks=64,
        adapters=(AdapterConfig("support", str(adapters["support"]), 8, 16.0),
                  AdapterConfig("legal", str(adapters["legal"]), 4, 8.0))))
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = {v: tok.decode(engine.generate([tok.encode(PROMPT)], greedy, variant=v)[0].new_token_ids)
            for v in ("tiny", "support", "legal")}
    assert len(set(want.values())) == 3, want

    cmd = [sys.executable, "-m", "kvfleet", "serve", "--model", str(tiny_dir), "--served-model-name", "tiny",
           "--lora", f"support={adapters['support']}", "--lora", f"legal={adapters['legal']}",
           "--dtype", "float32", "--kv-cache-mb", "4", "--threads", "1", "--port", "0"]
    with serving_process(cmd, 300) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        models = {m.id: m.model_extra.get("parent") for m in c.models.list().data}
        assert models == {"tiny": None, "support": "tiny", "legal": "tiny"}
        for model, text in want.items():
            r = c.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
            assert r.choices[0].text == text, model
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
        assert "does not exist" in str(e.value) and "support" in str(e.value)
