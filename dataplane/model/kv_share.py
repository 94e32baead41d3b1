"""Cross-variant prefix KV reuse (DroidSpeak) at the model level, on the dense reference backend.

Variant B reuses the prefix KV its sibling A computed, except in a few recomputed layers
(`kvfleet.dataplane.kvsharing` holds the profile format and `layer_groups`):

    cap = capture_prefix(model_a, ids, lora=adapter_a)           # A's K/V and the hidden entering each layer
    cache = shared_prefix_cache(model_b, cap, ids, [0, 1, 7])    # A's K/V; B's own in groups [0..1] and [7]
    logits = continuation_logits(model_b, cache, cont, offset=len(ids))   # [C, V], B over all layers

A group [i..j] is recomputed by B's layers i..j over the prefix tokens starting from A's hidden state
entering layer i (the E-cache; i == 0: B's own token embeddings). A "variant" is a base model plus an
optional LoRA adapter applied to every token (`LoRAAdapter`), or a full fine-tune (`load_variant`).
Shapes: T prefix tokens, C continuation tokens, H hidden, Hkv KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
from kvfleet.dataplane.kvsharing import layer_groups

from .attention import DenseAttention
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .loader import load_model, safetensors_files
from .lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoRAAdapter,
    LoRABatch,
    load_adapter,
    module_shapes,
    weights_identity,
)


@dataclass(frozen=True)
class PrefixCapture:
    """What one variant's prefill over the prefix leaves behind (everything a sibling could reuse)."""

    input_ids: torch.Tensor  # [T] int64
    k: tuple[torch.Tensor, ...]  # per layer [T, Hkv, D], RoPE applied (what the backend stores)
    v: tuple[torch.Tensor, ...]  # per layer [T, Hkv, D]
    hidden: tuple[torch.Tensor, ...]  # per layer: the hidden state entering it [T, H]; [0] = embeddings

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def cache(self) -> DenseAttention:
        """A fresh DenseAttention holding exactly these K/V (the tensors are shared, never written)."""
        attn = DenseAttention()
        attn.k, attn.v = dict(enumerate(self.k)), dict(enumerate(self.v))
        return attn


@dataclass(frozen=True)
class Variant:
    """A servable variant: its model, an optional LoRA adapter on every token, and its weights identity
    ("" for the base itself, as `LLMEngine.prefix_key` names it)."""

    model: LlamaForCausalLM
    config: ModelConfig
    adapter: LoRAAdapter | None = None
    weights_id: str = ""
    path: str = ""  # what was loaded: the adapter dir or the model dir
    model_dir: str = ""  # the HF model dir whose weights run (the base, for an adapter)


Lora = LoRAAdapter | LoRABatch | None  # an adapter on every token, a ready batch of exactly these tokens, or base


def lora_for(adapter: Lora, num_tokens: int, device: torch.device | str = "cpu") -> LoRABatch | None:
    """A LoRABatch applying `adapter` to all `num_tokens` tokens of a flat batch (None: the base weights);
    a LoRABatch is passed through once its token count is checked."""
    if adapter is None:
        return None
    if isinstance(adapter, LoRABatch):
        if adapter.token_slots.shape[0] != num_tokens:
            raise ValueError(f"the LoRABatch covers {adapter.token_slots.shape[0]} tokens, not {num_tokens}")
        return adapter
    slots = torch.zeros(num_tokens, dtype=torch.int64, device=device)  # [T]: every token is slot 0
    return LoRABatch([adapter], LoRABatch.stack([adapter]), slots)


def _positions(start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64, device=device)  # [n]


@torch.inference_mode()
def capture_prefix(model: LlamaForCausalLM, input_ids: torch.Tensor,
                   lora: Lora = None) -> PrefixCapture:
    """Prefill input_ids [T] layer by layer, keeping each layer's K/V and the hidden entering it."""
    ids = input_ids.to(model.lm_head.weight.device)
    positions = _positions(0, ids.shape[0], ids.device)
    batch = lora_for(lora, ids.shape[0], ids.device)
    attn = DenseAttention()
    hidden = model.embed(ids)  # [T, H]
    entering = []
    for layer in range(model.num_layers):
        entering.append(hidden)
        hidden = model.run_layers(hidden, positions, attn, start=layer, end=layer + 1, lora=batch)
    n = model.num_layers
    return PrefixCapture(ids, tuple(attn.k[i] for i in range(n)), tuple(attn.v[i] for i in range(n)),
                         tuple(entering))


@torch.inference_mode()
def shared_prefix_cache(model_b: LlamaForCausalLM, capture_a: PrefixCapture, input_ids: torch.Tensor,
                        recompute_layers: Iterable[int], lora_b: Lora = None) -> DenseAttention:
    """B's prefix cache under DroidSpeak reuse: A's K/V, except in `recompute_layers`, whose contiguous
    groups B recomputes from A's hidden entering each group's first layer (layer 0: B's embeddings)."""
    ids = input_ids.to(capture_a.input_ids.device)
    if not torch.equal(ids, capture_a.input_ids):
        raise ValueError("input_ids differ from the prefix A's capture was taken over")
    if model_b.num_layers != capture_a.num_layers:
        raise ValueError(f"B has {model_b.num_layers} layers, A's capture {capture_a.num_layers}")
    groups = layer_groups(recompute_layers)
    if groups and not (groups[0][0] >= 0 and groups[-1][1] < model_b.num_layers):
        raise ValueError(f"recompute layers {groups} outside [0, {model_b.num_layers})")
    positions = _positions(0, ids.shape[0], ids.device)
    batch = lora_for(lora_b, ids.shape[0], ids.device)
    cache = capture_a.cache()
    for first, last in groups:
        for layer in range(first, last + 1):  # DenseAttention appends: make room for B's own K/V
            del cache.k[layer], cache.v[layer]
        start = model_b.embed(ids) if first == 0 else capture_a.hidden[first]  # [T, H]: the E-cache
        model_b.run_layers(start, positions, cache, start=first, end=last + 1, lora=batch)
    return cache


@torch.inference_mode()
def continuation_logits(model: LlamaForCausalLM, cache: DenseAttention, cont_ids: torch.Tensor, offset: int,
                        lora: Lora = None) -> torch.Tensor:
    """cont_ids [C] at positions offset.. through the whole model, attending the prefix `cache` -> [C, V]
    float32 logits. The cache is left as it was (a copy of its dicts takes the appended K/V)."""
    cached = {k.shape[0] for k in cache.k.values()}
    if cached != {offset} or len(cache.k) != model.num_layers:
        raise ValueError(f"the cache holds {sorted(cached)} tokens in {len(cache.k)} layers; expected {offset} "
                         f"in each of {model.num_layers}")
    ids = cont_ids.to(model.lm_head.weight.device)
    work = DenseAttention()
    work.k, work.v = dict(cache.k), dict(cache.v)
    hidden = model(ids, _positions(offset, ids.shape[0], ids.device), work, lora_for(lora, ids.shape[0], ids.device))
    return model.compute_logits(hidden)


def load_variant(path: str | Path, base_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu",
                 models: MutableMapping[str, tuple[LlamaForCausalLM, ModelConfig]] | None = None) -> Variant:
    """A variant from a PEFT adapter dir (adapter_config.json: base + adapter; `base_dir` defaults to the
    adapter's base_model_name_or_path) or an HF model dir (the base when it is `base_dir`, else a full
    fine-tune). `models` (path -> loaded) lets siblings on one base share its weights in memory."""
    path = Path(path).resolve()
    models = {} if models is None else models

    def load(d: Path) -> tuple[LlamaForCausalLM, ModelConfig]:
        key = str(d.resolve())
        if key not in models:
            models[key] = load_model(d, dtype=dtype, device=device)
        return models[key]

    if (path / CONFIG_FILE).is_file():
        if base_dir is None:
            base_dir = json.loads((path / CONFIG_FILE).read_text()).get("base_model_name_or_path") or None
        if base_dir is None or not (Path(base_dir) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a LoRA adapter: give its base model directory (got {base_dir})")
        model, config = load(Path(base_dir))
        adapter = load_adapter(path.name, path, config.num_hidden_layers, module_shapes(config), device, dtype)
        return Variant(model, config, adapter, weights_identity(path / CONFIG_FILE, path / WEIGHTS_FILE), str(path),
                       str(Path(base_dir).resolve()))
    model, config = load(path)
    is_base = base_dir is not None and Path(base_dir).resolve() == path
    return Variant(model, config, None, "" if is_base else weights_identity(*safetensors_files(path)), str(path),
                   str(path))
