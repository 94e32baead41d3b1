"""Load an HF-format Llama checkpoint directory into `LlamaForCausalLM`.

Reads `config.json` and either `model.safetensors` or the shards listed in
`model.safetensors.index.json`, maps HF tensor names onto our (packed) parameters
and fails loudly on missing, unexpected or mis-shaped tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .config import ModelConfig
from .llama import LlamaForCausalLM

# HF tensors we accept and drop: rotary buffers some old checkpoints carry.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint does not match the model its config.json describes."""


_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """A torch dtype from a dtype, its name, or None (the checkpoint's `torch_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or config.torch_dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: the single file, or every shard of the index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that do not exist: {absent}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def hf_sources(model: nn.Module) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensor names it is built from (concatenated on dim 0).

    Packed parameters are declared by their owning module's `PACKED` map,
    e.g. `...self_attn.qkv_proj.weight` <- `...self_attn.{q,k,v}_proj.weight`.
    """
    sources: dict[str, list[str]] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for module_name, module in model.named_modules():
        packed: dict[str, tuple[str, ...]] = getattr(module, "PACKED", {})
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if tied and full == "lm_head.weight":
                continue
            sources.setdefault(full, [full])  # a packing parent (visited first) wins
        for child_name, child in module.named_children():
            if child_name not in packed:
                continue
            for param_name, _ in child.named_parameters(recurse=False):
                prefix = f"{module_name}." if module_name else ""
                sources[f"{prefix}{child_name}.{param_name}"] = [
                    f"{prefix}{part}.{param_name}" for part in packed[child_name]]
    return sources


class _TensorIndex:
    """HF tensor name -> the open safetensors file that holds it."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self.where: dict[str, Any] = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():
                self.where[name] = handle

    def get(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self.where[name].get_tensor(name)
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def names(self) -> Iterator[str]:
        return iter(self.where)


def load_model(model_dir: str | Path, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu") -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model described by `model_dir/config.json` and fill it with its weights.

    dtype: torch dtype or name; None = the checkpoint's `torch_dtype`. Returns (model in
    eval mode on `device`, config). Raises CheckpointError on any name or shape mismatch.
    """
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch_dtype)  # no memory yet: cast is free
    model = model.to_empty(device=device)  # allocate once, directly in the target dtype
    if config.tie_word_embeddings:  # to_empty re-materializes tied params separately
        model.lm_head.weight = model.model.embed_tokens.weight
    sources = hf_sources(model)
    params = dict(model.named_parameters())

    with ExitStack() as stack:
        index = _TensorIndex(safetensors_files(model_dir), stack)
        available = set(index.names())
        needed = {hf for hf_names in sources.values() for hf in hf_names}
        missing = sorted(needed - available)
        if missing:
            raise CheckpointError(f"{model_dir}: {len(missing)} tensors missing, e.g. {missing[:5]}")
        allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
        unexpected = sorted(n for n in available - needed - allowed_extra if not n.endswith(IGNORED_SUFFIXES))
        if unexpected:
            raise CheckpointError(f"{model_dir}: {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")

        with torch.no_grad():
            for ours, hf_names in sources.items():
                param = params[ours]
                shapes = [index.shape(n) for n in hf_names]
                rows = sum(s[0] for s in shapes)
                if any(s[1:] != tuple(param.shape[1:]) for s in shapes) or rows != param.shape[0]:
                    raise CheckpointError(
                        f"{model_dir}: shape mismatch for {ours}: checkpoint {dict(zip(hf_names, shapes, strict=True))} "
                        f"vs model {tuple(param.shape)} (config.json disagrees with the weights?)")
                offset = 0
                for name, shape in zip(hf_names, shapes, strict=True):
                    param[offset:offset + shape[0]].copy_(index.get(name))
                    offset += shape[0]
    model.eval().requires_grad_(False)
    return model, config
