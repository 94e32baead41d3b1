"""`write_tiny_llama`: a deterministic random small Llama in HF format, for tests and demos.

The directory is a real checkpoint: `transformers` loads it, and so does our loader.
The tokenizer is a byte-level BPE trained in-process on a fixed text, so any string
(any language, emoji) encodes and decodes back exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .config import ModelConfig

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]  # ids 0..3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A fleet of language models serves many users at once;
each request brings a prompt, and the engine answers one token at a time. Prefill reads the prompt,
decode writes the answer, and the KV cache remembers what was read so nothing is computed twice.
Numbers matter too: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 3.14159 -7 1e-5.
Code appears as well: def main(argv): return 0  # comment  {"key": [1, 2, 3]} x = y + z * 2;
Unicode: café, naïve, Straße, élève, 東京, 你好世界, こんにちは, привет, مرحبا, 🙂🚀✨.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
"""

DEFAULTS: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 0,
    "eos_token_id": [1, 3],
    "torch_dtype": "float32",
}


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on a fixed text; specials are ids 0..3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    # Prepend BOS in the tokenizer itself too, so tools reading only tokenizer.json agree
    # with tokenizer_config.json's add_bos_token.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    return tok


def _random_weights(config: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """HF-named tensors; scales chosen so logits are decisive (greedy parity is meaningful)."""

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=1 / math.sqrt(in_f))

    def norm_weight() -> torch.Tensor:
        return 1 + normal(config.hidden_size, std=0.1)

    h, i = config.hidden_size, config.intermediate_size
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(config.vocab_size, h, std=1.0)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        for name, out_f in (("q_proj", config.q_size), ("k_proj", config.kv_size), ("v_proj", config.kv_size)):
            w[p + f"self_attn.{name}.weight"] = linear(out_f, h)
            if config.attention_bias:
                w[p + f"self_attn.{name}.bias"] = normal(out_f, std=0.1)
        w[p + "self_attn.o_proj.weight"] = linear(h, config.q_size)
        if config.attention_bias:
            w[p + "self_attn.o_proj.bias"] = normal(h, std=0.1)
        w[p + "mlp.gate_proj.weight"] = linear(i, h)
        w[p + "mlp.up_proj.weight"] = linear(i, h)
        w[p + "mlp.down_proj.weight"] = linear(h, i)
        if config.mlp_bias:
            for name, out_f in (("gate_proj", i), ("up_proj", i), ("down_proj", h)):
                w[p + f"mlp.{name}.bias"] = normal(out_f, std=0.1)
    w["model.norm.weight"] = norm_weight()
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = normal(config.vocab_size, h, std=3 / math.sqrt(h))
    return w


def write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], num_shards: int = 1) -> None:
    """`model.safetensors`, or `num_shards` shards plus `model.safetensors.index.json`."""
    if num_shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(chunk, str(out_dir / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in chunk}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_llama(out_dir: str | Path, seed: int = 0, num_shards: int = 1, **overrides: Any) -> Path:
    """Write a random tiny Llama (config, weights, tokenizer, chat template) into `out_dir`.

    overrides: HF config.json keys, e.g. `tie_word_embeddings=True`, `num_key_value_heads=1`,
    `rope_scaling={"rope_type": "llama3", ...}`. Same seed and overrides -> same bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = {**DEFAULTS, **overrides}
    if "head_dim" not in overrides and ("hidden_size" in overrides or "num_attention_heads" in overrides):
        hf["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    config = ModelConfig.from_hf_dict(hf)
    tokenizer = build_tokenizer(config.vocab_size)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's")

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, config.torch_dtype)
    weights = {k: v.to(dtype).contiguous() for k, v in _random_weights(config, gen).items()}
    write_safetensors(out, weights, num_shards)

    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation_config = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out


def write_random_lora(out_dir: str | Path, model_dir: str | Path, rank: int = 8, alpha: float = 16.0,
                      target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"), seed: int = 0,
                      std: float = 0.3) -> Path:
    """A PEFT LoRA adapter for the model in `model_dir` with random non-zero A and B (B is zero in a fresh
    PEFT init; here it is not, so the adapter changes the outputs). Same arguments -> same bytes."""
    from .lora import module_shapes, peft_key, save_adapter

    config = ModelConfig.from_dir(Path(model_dir))
    shapes = module_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in target_modules:
            d_in, d_out = shapes[module]
            tensors[peft_key(layer, module, "A")] = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
            tensors[peft_key(layer, module, "B")] = torch.randn(d_out, rank, generator=gen) * std / math.sqrt(rank)
    return save_adapter(out_dir, tensors, rank, alpha, target_modules, base_model=str(model_dir))


def write_perturbed_copy(out_dir: str | Path, model_dir: str | Path, seed: int = 1, scale: float = 0.05,
                         layers: tuple[int, ...] | None = None) -> Path:
    """A stand-in full fine-tune of the model in `model_dir`: its weights plus seeded noise of `scale` times each
    tensor's std, in decoder `layers` only (None: every tensor). HF format, no tokenizer (the base's serves)."""
    from safetensors.torch import load_file

    from .loader import safetensors_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v for f in safetensors_files(Path(model_dir)) for k, v in load_file(str(f)).items()}
    prefixes = None if layers is None else tuple(f"model.layers.{i}." for i in layers)
    for name in sorted(tensors):
        if prefixes is None or name.startswith(prefixes):
            t = tensors[name]
            tensors[name] = (t.float() + torch.randn(t.shape, generator=gen) * scale * t.float().std()).to(t.dtype)
    write_safetensors(out, tensors)
    (out / "config.json").write_text((Path(model_dir) / "config.json").read_text())
    return out
