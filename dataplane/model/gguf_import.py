"""Convert a GGUF Llama file into an HF-format directory our loader (and `transformers`) reads.

Every tensor is dequantized to float (`gguf.quants.dequantize`), renamed to its HF name
and written as safetensors; `config.json` is rebuilt from `llama.*` metadata and the
tokenizer from `tokenizer.ggml.*` (see gguf_tokenizer.py).

NOTE: llama.cpp's converter permutes the rows of q_proj/k_proj so that its RoPE can
rotate adjacent pairs (x0,x1),(x2,x3)...; HF Llama rotates halves (x_i, x_{i+D/2}).
We invert that permutation (`unpermute_qk`), otherwise every output is garbage.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file

from .config import ModelConfig, RopeScaling
from .gguf_tokenizer import build_tokenizer_files
from .llama import rope_inv_freq

# Bump when the output of the conversion changes: caches are keyed by it.
IMPORTER_VERSION = "1"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 2 << 30


class GGUFImportError(ValueError):
    """The GGUF file is not a Llama model this importer understands."""


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF Llama name, e.g. `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise GGUFImportError(f"unknown GGUF tensor {gguf_name!r} (not a plain Llama model?)")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: w [n_heads*D, ...] in its interleaved-pair layout -> HF's."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    # llama.cpp: w.reshape(n, 2, D/2, ...).swapaxes(1, 2) ; inverse: reshape(n, D/2, 2, ...).swapaxes(1, 2)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def llama3_scaling_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float,
                                     original_ctx: int) -> dict[str, Any] | None:
    """Recover HF `rope_scaling` from llama.cpp's `rope_freqs.weight` (per-frequency divisors).

    llama.cpp bakes Llama 3.1-style scaling into that tensor; we find the llama3 parameters
    that reproduce it (factor = the largest divisor; the standard ramp 1..4) or refuse.
    """
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
        scaling = RopeScaling("llama3", factor, low, high, original_ctx)
        expected = (rope_inv_freq(head_dim, theta, None) / rope_inv_freq(head_dim, theta, scaling)).numpy()
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-3):
            return scaling.to_dict()
    raise GGUFImportError("rope_freqs.weight does not match any llama3 RoPE scaling this importer knows")


def build_config(meta: dict[str, Any], vocab_size: int, tied: bool, dtype: str,
                 rope_freqs: np.ndarray | None = None) -> dict[str, Any]:
    """config.json (HF LlamaForCausalLM) from `llama.*` metadata (and `rope_freqs.weight`, if any)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise GGUFImportError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count")
                   or hidden // n_heads)
    rope_scaling = None
    scaling_type = meta.get("llama.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise GGUFImportError(f"rope scaling {scaling_type!r} is not supported")
    theta = _f32(get("rope.freq_base", 10000.0))
    if rope_freqs is not None:
        original_ctx = int(meta.get("llama.rope.scaling.original_context_length") or 8192)
        rope_scaling = llama3_scaling_from_freq_factors(rope_freqs, head_dim, theta, original_ctx)
    tok_meta = {k: meta.get(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv") or n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tok_meta["bos_token_id"],
        "eos_token_id": tok_meta["eos_token_id"],
        "torch_dtype": dtype,
    }
    ModelConfig.from_hf_dict(config)  # validate
    return config


def _f32(value: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _dequantized(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 numpy, in HF (row-major, [out, in]) shape."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne0 (fastest) first
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = np.asarray(tensor.data, dtype=np.float32)
    elif tensor.tensor_type == GGMLQuantizationType.BF16:
        raw = np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
        data = raw.view(np.float32)
    else:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    return data.reshape(shape)


class _ShardWriter:
    """Writes tensors into safetensors shards of at most MAX_SHARD_BYTES, then the index (if >1 shard)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.names_by_shard: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > MAX_SHARD_BYTES:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        idx = len(self.names_by_shard)
        save_file(self.pending, str(self.out_dir / f"shard-{idx}.tmp"), metadata={"format": "pt"})
        self.names_by_shard.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.names_by_shard)
        if n == 1:
            (self.out_dir / "shard-0.tmp").rename(self.out_dir / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self.names_by_shard):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i}.tmp").rename(self.out_dir / fname)
            weight_map |= {name: fname for name in names}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Convert `gguf_path` into the HF-format directory `out_dir` (created; must not hold a model).

    dtype: "bfloat16", "float16" or "float32" for the written weights. Returns `out_dir`.
    """
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a model")
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFImportError("GGUF file has no token_embd.weight")
    config = build_config(meta, vocab_size=int(embd.shape[1]), tied="output.weight" not in names, dtype=dtype,
                          rope_freqs=None if freqs is None else _dequantized(freqs))

    writer = _ShardWriter(out)
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # folded into config.json's rope_scaling
            continue
        name = hf_tensor_name(tensor.name)
        w = _dequantized(tensor)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        writer.add(name, torch.from_numpy(np.array(w, copy=True)).to(_TORCH_DTYPES[dtype]))
    writer.close()

    tokenizer, tokenizer_config, generation_config = build_tokenizer_files(meta, config["max_position_embeddings"])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the directory complete
    provenance = {"source": Path(gguf_path).name, "importer_version": IMPORTER_VERSION,
                  "file_type": meta.get("general.file_type"), "name": meta.get("general.name"),
                  "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "kvfleet_import.json").write_text(json.dumps(provenance, indent=2))
    return out

