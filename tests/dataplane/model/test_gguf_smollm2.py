"""The real SmolLM2-135M-Instruct GGUF, converted: config, tokenizer and greedy generation vs `transformers`."""

from __future__ import annotations

import time

import pytest
import torch
from kvfleet.dataplane.model.attention import DenseAttention
from kvfleet.dataplane.model.config import ModelConfig
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

STRINGS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  indented\n\tcode: def f(x): return x ** 2  # square",
    "café naïve 東京 🙂 emoji and accents",
    "<|im_start|>user\nHi<|im_end|>\n",
]

PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
    "List three prime numbers greater than 100, separated by commas, and nothing else please: ",
]


def greedy(model, prompt: list[int], max_new: int, eos: tuple[int, ...]) -> list[int]:
    """Prefill, then one token at a time with a dense cache; stops after an EOS token."""
    attn, out = DenseAttention(), []
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), attn)
        for step in range(max_new):
            token = int(model.compute_logits(hidden[-1:]).argmax(-1))
            out.append(token)
            if token in eos:
                break
            hidden = model(torch.tensor([token]), torch.tensor([len(prompt) + step]), attn)
    return out


def test_converted_config(smollm2_dir) -> None:
    config = ModelConfig.from_dir(smollm2_dir)
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert 2 in config.eos_token_ids  # <|im_end|>: the engine stops chat turns on it


def test_tokenizer_matches_transformers(smollm2_dir) -> None:
    ours = Tokenizer.from_dir(smollm2_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert ours.token_to_id("<|im_end|>") == 2 and 2 in ours.eos_token_ids
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)


def test_greedy_generation_matches_transformers(smollm2_dir) -> None:
    start = time.perf_counter()
    tok = Tokenizer.from_dir(smollm2_dir)
    ours, _ = load_model(smollm2_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    eos = tok.eos_token_ids
    for text in PROMPTS:
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        got = greedy(ours, prompt, 20, eos)
        with torch.inference_mode():
            full = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
        want = full[0, len(prompt):].tolist()
        assert got == want, f"{text!r}: ours {tok.decode(got)!r} vs transformers {tok.decode(want)!r}"
    answer = tok.decode(greedy(ours, tok.encode_chat([{"role": "user", "content": PROMPTS[0]}]), 20, eos))
    assert "Paris" in answer  # the weights (and the q/k un-permutation) are right, not just consistent
    print(f"greedy parity on {len(PROMPTS)} prompts: {time.perf_counter() - start:.1f}s")
