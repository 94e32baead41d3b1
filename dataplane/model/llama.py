"""Llama-family decoder over a flat batch of tokens, attention delegated to a backend.

Shapes: T = tokens in this step (all sequences concatenated), H = hidden size,
Hq/Hkv = query/key-value heads, D = head dim, V = vocab.

Weights are stored *packed* (q|k|v in one `qkv_proj`, gate|up in one `gate_up_proj`):
one matmul instead of three (two) per layer. Each module that packs declares its
`PACKED` map, which the loader uses to build packed tensors from HF names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend
from .config import ModelConfig, RopeScaling
from .lora import LoRABatch


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like the reference implementation."""

    kernels: Any = None  # CPU kernels (`dataplane/kernels`, set by the engine): one pass instead of ~6 ops

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        if self.kernels is not None and _kernel_ok(x):
            out: torch.Tensor = self.kernels.rms_norm(x, self.weight, self.eps)
            return out
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _kernel_ok(x: torch.Tensor) -> bool:
    """Whether the CPU kernels take `x` (a contiguous [T, H] CPU tensor outside autograd)."""
    return x.device.type == "cpu" and x.dim() == 2 and x.is_contiguous() and not torch.is_grad_enabled()


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [D/2] (float32), with linear or llama3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # always on CPU: the model may be built on "meta"
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed down by `factor`, short ones kept, smooth in between
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a cos/sin cache indexed by absolute position.

    NOTE: the cache covers `max_position_embeddings` and is built once per device on
    first use, so a step never syncs with the device to check its length.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)  # [D/2], f32
        self.max_positions = config.max_position_embeddings
        self._cos: torch.Tensor | None = None  # [P, D] float32
        self._sin: torch.Tensor | None = None

    def _cache(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._sin is None or self._cos.device != device:
            pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))  # [P, D/2]
            emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, D] in `dtype` (broadcast over heads)."""
        cos, sin = self._cache(positions.device)
        return cos[positions].to(dtype)[:, None, :], sin[positions].to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, Hx, D] rotated by cos/sin [T, 1, D] (rotate-half layout, as HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    """GQA self-attention; where K/V live and how they are attended is the backend's business."""

    PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    kernels: Any = None  # CPU kernels: RoPE in place on the qkv rows

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, lora: LoRABatch | None = None) -> torch.Tensor:  # x [T, H] -> [T, H]
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, Hq*D + 2*Hkv*D]
        if lora is not None:
            qkv = lora.add_packed(self.layer_idx, ("q_proj", "k_proj", "v_proj"),
                                  [self.q_size, self.kv_size, self.kv_size], x, qkv)
        if self.kernels is not None and _kernel_ok(qkv) and cos.is_contiguous():
            self.kernels.rope_(qkv, cos.view(t, -1), sin.view(t, -1), self.n_heads, self.n_kv_heads)
            q, k, v = (part.view(t, -1, self.head_dim)  # [T, Hq|Hkv|Hkv, D], rows strided
                       for part in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(t, self.n_heads, self.head_dim), cos, sin)  # [T, Hq, D]
            k = apply_rope(k.view(t, self.n_kv_heads, self.head_dim), cos, sin)  # [T, Hkv, D]
            v = v.view(t, self.n_kv_heads, self.head_dim)  # [T, Hkv, D]
        out = attn.attend(self.layer_idx, q, k, v).reshape(t, self.q_size)  # [T, Hq*D]
        projected: torch.Tensor = self.o_proj(out)
        if lora is not None:
            projected = lora.add(self.layer_idx, "o_proj", out, projected)
        return projected


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)). The MLP seam: any module mapping [T, H] -> [T, H]."""

    PACKED = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:  # [T, H] -> [T, H]
        gate_up = self.gate_up_proj(x)  # [T, 2I]
        if lora is not None:
            gate_up = lora.add_packed(self.layer_idx, ("gate_proj", "up_proj"),
                                      [self.intermediate_size, self.intermediate_size], x, gate_up)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        act = F.silu(gate) * up  # [T, I]
        down: torch.Tensor = self.down_proj(act)
        if lora is not None:
            down = lora.add(self.layer_idx, "down_proj", act, down)
        return down


def make_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
    """The MLP of one layer. A MoE config will return its sparse MLP here."""
    return SwiGLUMLP(config, layer_idx)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    kernels: Any = None  # CPU kernels: the residual add and the second norm in one pass

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_mlp(config, layer_idx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, lora: LoRABatch | None = None) -> torch.Tensor:  # [T, H] -> [T, H]
        attended = self.self_attn(self.input_layernorm(x), cos, sin, attn, lora)
        if self.kernels is not None and _kernel_ok(x) and attended.is_contiguous():
            norm = self.post_attention_layernorm
            x, normed = self.kernels.add_rms_norm(x, attended, norm.weight, norm.eps)
        else:
            x = x + attended
            normed = self.post_attention_layernorm(x)
        out: torch.Tensor = x + (self.mlp(normed, lora) if lora is not None else self.mlp(normed))
        return out


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The Llama-family causal LM on a flat token batch; see module docstring for shapes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> hidden [T, H] entering layer 0."""
        hidden: torch.Tensor = self.model.embed_tokens(input_ids)
        return hidden

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                   start: int = 0, end: int | None = None, lora: LoRABatch | None = None) -> torch.Tensor:
        """Layers [start, end) on hidden [T, H] -> [T, H] (no final norm).

        Lets a caller recompute a contiguous layer group from a stored hidden state
        (DroidSpeak's E-cache) without running the whole stack.
        """
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        for layer in self.model.layers[start:end]:
            hidden = layer(hidden, cos, sin, attn, lora)
        return hidden

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBackend, lora: LoRABatch | None = None) -> torch.Tensor:
        """input_ids [T], positions [T] -> final-normed hidden [T, H].

        lora: the step's adapters and which token uses which (None: every token runs the base weights).
        """
        hidden = self.run_layers(self.embed(input_ids), positions, attn, lora=lora)
        normed: torch.Tensor = self.model.norm(hidden)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> float32 logits [N, V]."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits.float()
