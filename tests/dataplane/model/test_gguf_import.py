"""GGUF import without the real file: a tiny Llama written as GGUF the way llama.cpp would, imported back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from kvfleet.dataplane.model.attention import DenseAttention
from kvfleet.dataplane.model.cli import main as model_cli
from kvfleet.dataplane.model.config import ModelConfig
from kvfleet.dataplane.model.gguf_import import hf_tensor_name, unpermute_qk
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tokenizer import Tokenizer
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (written from its documented behaviour)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)  # 6 heads of dim 8
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 6), 6), w)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)


def test_tensor_names() -> None:
    assert hf_tensor_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(ValueError, match="unknown GGUF tensor"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


_GGUF_LAYER = {v: k for k, v in {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}.items()}


def llama_cpp_rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs.weight` for a llama3-scaled config (its converter's documented formula)."""
    sc = cfg.rope_scaling
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    out = []
    for i in range(0, cfg.head_dim, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (i / cfg.head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(sc.factor)
        else:
            smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
                sc.high_freq_factor - sc.low_freq_factor)
            out.append(1 / ((1 - smooth) / sc.factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model_dir, path, quant) -> None:
    """Write the HF tiny model at `model_dir` as a llama.cpp-style GGUF (q/k permuted, 2-D tensors `quant`)."""
    cfg = ModelConfig.from_dir(model_dir)
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    vocab = sorted(tok_json["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok_json["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template(tok_cfg["chat_template"])
    if cfg.rope_scaling is not None:  # llama.cpp stores llama3 scaling only as this tensor
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(cfg))
    for name, t in load_file(str(model_dir / "model.safetensors")).items():
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        layer = name.split(".")
        if name.startswith("model.layers."):
            gname = f"blk.{layer[2]}.{_GGUF_LAYER['.'.join(layer[3:-1])]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        if a.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("quant", ["F32", "F16", "BF16", "Q8_0"])
def test_gguf_round_trip_reproduces_the_model(tiny_model_dir, tmp_path, quant) -> None:
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", qtype)
    out = tmp_path / "imported"
    assert model_cli(["import-gguf", str(tmp_path / "tiny.gguf"), str(out), "--dtype", "float32"]) == 0

    original, cfg = load_model(tiny_model_dir, dtype=torch.float32)
    imported, icfg = load_model(out, dtype=torch.float32)
    assert (icfg.num_hidden_layers, icfg.num_key_value_heads, icfg.head_dim) == (
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    ids = torch.randint(4, cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = original.compute_logits(original(ids, torch.arange(60), DenseAttention()))
        b = imported.compute_logits(imported(ids, torch.arange(60), DenseAttention()))
    # F16/BF16: weights rounded once; Q8_0: 8-bit blocks of 32 with an f16 scale
    tol = {"F32": 1e-5, "F16": 0.02, "BF16": 0.2, "Q8_0": 0.5}[quant]
    assert (a - b).abs().max().item() < tol
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= (1.0 if quant == "F32" else 0.9)

    ours, rebuilt = Tokenizer.from_dir(tiny_model_dir), Tokenizer.from_dir(out)
    for text in ["Hello, world! café 🙂", "def f(x): return 42", "<|im_start|>user\nhi<|im_end|>"]:
        assert rebuilt.encode(text) == ours.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert rebuilt.apply_chat_template(chat) == ours.apply_chat_template(chat)
    assert rebuilt.add_bos and 1 in rebuilt.eos_token_ids


def test_import_refuses_to_overwrite(tiny_model_dir, tmp_path) -> None:
    write_gguf(tiny_model_dir, tmp_path / "t.gguf", gguf.GGMLQuantizationType.F32)
    assert model_cli(["import-gguf", str(tmp_path / "t.gguf"), str(tiny_model_dir)]) == 1


def test_smollm2_dir_converts_once_atomically(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from kvfleet.dataplane.model import smollm2

    write_gguf(tiny_model_dir, tmp_path / "stand-in.gguf", gguf.GGMLQuantizationType.F32)
    monkeypatch.setattr(smollm2, "smollm2_gguf", lambda: tmp_path / "stand-in.gguf")
    monkeypatch.setenv("KVFLEET_CACHE", str(tmp_path / "cache"))
    first = smollm2.smollm2_dir()
    assert first.parent == tmp_path / "cache" / "models" and (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary directory left behind
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert smollm2.smollm2_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again


def _byte_vocab_meta(pre: str, model: str = "gpt2") -> dict:
    from tokenizers import pre_tokenizers

    tokens = ["<|bos|>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    return {"tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1), "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.add_bos_token": True}


@pytest.mark.parametrize("pre, pieces", [
    ("llama-bpe", ["123", "45", " go"]),  # digits in groups of three
    ("smollm", ["1", "2", "3", "4", "5", " go"]),  # one digit at a time
    ("gpt2", ["12345", " go"]),
])
def test_gguf_pre_tokenizers(pre, pieces) -> None:
    from kvfleet.dataplane.model.gguf_tokenizer import build_tokenizer_files

    tok, config, _ = build_tokenizer_files(_byte_vocab_meta(pre), 128)
    assert config["add_bos_token"] and config["bos_token"] == "<|bos|>"
    words = tok.pre_tokenizer.pre_tokenize_str("12345 go")
    assert [tok.decoder.decode([w]) for w, _ in words] == pieces


@pytest.mark.parametrize("meta, match", [
    (_byte_vocab_meta("gpt2", model="bert"), "tokenizer model 'bert' is not supported"),
    (_byte_vocab_meta("deepseek-coder"), "pre-tokenizer 'deepseek-coder' is not supported"),
])
def test_gguf_tokenizer_rejects_unsupported(meta, match) -> None:
    from kvfleet.dataplane.model.gguf_tokenizer import build_tokenizer_files

    with pytest.raises(NotImplementedError, match=match):
        build_tokenizer_files(meta, 128)


def test_gguf_sentencepiece_vocab_matches_sentencepiece(tmp_path) -> None:
    """A 'llama' (SentencePiece BPE, byte fallback) GGUF vocabulary encodes like sentencepiece itself."""
    spm = pytest.importorskip("sentencepiece")
    from kvfleet.dataplane.model.gguf_tokenizer import build_tokenizer_files
    from kvfleet.dataplane.model.tiny import _TRAINING_TEXT

    lines = _TRAINING_TEXT.splitlines() * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=0.98,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()

    def kind(i: int) -> int:  # GGUF token types
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True}
    tok, config, generation = build_tokenizer_files(meta, 128)
    assert (config["bos_token"], config["eos_token"], generation["eos_token_id"]) == ("<s>", "</s>", [2])
    texts = [*lines[:8], "  two  spaces", "unseen: ÆØÅ ĳ 🦀 zzqx", "x", "12345 tabs\tand\nnewlines"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("hi", add_special_tokens=True).ids[0] == sp.bos_id()
    # like llama.cpp (and HF's legacy Llama tokenizer): a space prefix again after a special token
    assert tok.encode("<s>hi", add_special_tokens=False).ids == [sp.bos_id(), *sp.encode("hi")]


def test_gguf_rope_freqs_become_llama3_rope_scaling(tmp_path) -> None:
    from kvfleet.dataplane.model.tiny import write_tiny_llama

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model_dir = write_tiny_llama(tmp_path / "hf", seed=5, rope_scaling=scaling, rope_theta=500000.0,
                                 max_position_embeddings=16384)
    write_gguf(model_dir, tmp_path / "scaled.gguf", gguf.GGMLQuantizationType.F32)
    assert model_cli(["import-gguf", str(tmp_path / "scaled.gguf"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert ModelConfig.from_dir(tmp_path / "out").rope_scaling == ModelConfig.from_dir(model_dir).rope_scaling
    original, cfg = load_model(model_dir, dtype=torch.float32)
    imported, _ = load_model(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(4, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = original(ids, torch.arange(40), DenseAttention())
        b = imported(ids, torch.arange(40), DenseAttention())
    assert torch.equal(a, b)
