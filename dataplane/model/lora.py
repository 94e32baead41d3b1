"""PEFT LoRA adapters: read (and write) the format users bring, and the batched low-rank delta.

A PEFT adapter directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules)
and `adapter_model.safetensors` with tensors named
`base_model.model.model.layers.{N}.{self_attn|mlp}.{module}.lora_{A|B}.weight`:
A is [r, in], B is [out, r], and a target module's output becomes `W x + (alpha / r) * B A x`
(alpha / sqrt(r) with `use_rslora`). Anything else a PEFT config can ask for (DoRA, biases, per-module
ranks, modules_to_save, embeddings or lm_head) is refused with the reason, never ignored.

`LoRABatch` applies several adapters to one flat token batch (Punica/S-LoRA style): each token carries
the slot of its adapter (-1: the base); per (layer, module) the step's S adapters are stacked, zero-padded
to the largest rank r: A [S, r, in] and scaled B^T [S, r, out]. Two exact ways to apply them, chosen per
step by how the tokens spread over the adapters:

    grouped (tokens spread evenly, e.g. decode):  xs = x[gather]  [S, Tmax, in]   (each adapter's tokens)
        delta[gather] = bmm(bmm(xs, A^T), B^T)    -> T*r multiply-adds per input feature
    masked (one adapter holds most tokens, e.g. a long prefill):
        delta = ((x @ A.view(S*r, in)^T) * mask) @ B^T.view(S*r, out)    mask [T, S*r]: 1 on the token's own slot

Base tokens get an exact zero either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTN_MODULES + MLP_MODULES
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter this engine cannot serve as declared; the message says why."""


def peft_key(layer: int, module: str, which: str) -> str:
    """The PEFT tensor name of one LoRA matrix (which: "A" or "B")."""
    block = "self_attn" if module in ATTN_MODULES else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter_config.json declares, checked against what this engine applies."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_config(adapter_dir: str | Path) -> AdapterSpec:
    """Parse and check `adapter_config.json`; raises AdapterError naming the unsupported field."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {CONFIG_FILE} (a PEFT LoRA adapter directory)")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA is served")
    refused = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "rank_pattern": {},
               "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None}
    for key, ok in refused.items():
        val = cfg.get(key, ok)
        if val not in (ok, None) and not (isinstance(ok, dict) and not val):
            raise AdapterError(f"{path}: {key}={val!r} is not supported (the engine applies plain LoRA)")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # a regex over module names, as PEFT allows
        targets = [m for m in MODULES if re.search(targets, f"model.layers.0.x.{m}")]
    targets = tuple(sorted(set(targets or ()), key=lambda m: MODULES.index(m) if m in MODULES else 99))
    unknown = [m for m in targets if m not in MODULES]
    if unknown or not targets:
        raise AdapterError(f"{path}: target_modules {list(targets)}: LoRA applies to {list(MODULES)}")
    return AdapterSpec(int(cfg["r"]), float(cfg["lora_alpha"]), targets, bool(cfg.get("use_rslora", False)))


def module_shapes(mc: Any) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA-targetable module of a Llama-family config."""
    h, i = mc.hidden_size, mc.intermediate_size
    return {"q_proj": (h, mc.q_size), "k_proj": (h, mc.kv_size), "v_proj": (h, mc.kv_size),
            "o_proj": (mc.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def weights_identity(*paths: Path) -> str:
    """A short content hash of weight files: part of the prefix-cache key of the variant they serve."""
    h = hashlib.blake2b(digest_size=8)
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class LoRAAdapter:
    """One adapter's matrices on the engine's device: (layer, module) -> (A [r, in], B*scale [out, r])."""

    name: str
    spec: AdapterSpec
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def adapter_nbytes(adapter_dir: str | Path, dtype: torch.dtype) -> int:
    """Bytes the adapter takes once loaded in `dtype` (from the safetensors header; nothing is read)."""
    with safe_open(str(Path(adapter_dir) / WEIGHTS_FILE), framework="pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return numel * torch.empty((), dtype=dtype).element_size()


def load_adapter(name: str, adapter_dir: str | Path, num_layers: int, shapes: dict[str, tuple[int, int]],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Read a PEFT adapter for a base with `num_layers` layers and module (in, out) `shapes`.

    Raises AdapterError on an unsupported config, a missing/unexpected tensor or a wrong shape.
    """
    spec = read_adapter_config(adapter_dir)
    adapter = LoRAAdapter(name, spec)
    with safe_open(str(Path(adapter_dir) / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        for key in keys:
            m = _KEY.match(key.replace(".default.", "."))
            if m is None or m.group(3) not in spec.target_modules or int(m.group(1)) >= num_layers:
                raise AdapterError(f"{adapter_dir}: unexpected tensor {key!r} (targets {list(spec.target_modules)}, "
                                   f"{num_layers} layers)")
        for layer in range(num_layers):
            for module in spec.target_modules:
                ka, kb = peft_key(layer, module, "A"), peft_key(layer, module, "B")
                if ka not in keys or kb not in keys:
                    raise AdapterError(f"{adapter_dir}: missing {ka if ka not in keys else kb}")
                a, b = f.get_tensor(ka), f.get_tensor(kb)
                d_in, d_out = shapes[module]
                if tuple(a.shape) != (spec.rank, d_in) or tuple(b.shape) != (d_out, spec.rank):
                    raise AdapterError(f"{adapter_dir}: {module} of layer {layer}: A {tuple(a.shape)}, B "
                                       f"{tuple(b.shape)}; the base needs A ({spec.rank}, {d_in}), B ({d_out}, "
                                       f"{spec.rank})")
                # NOTE: the scale is folded into B once here, so a step multiplies by it never
                adapter.weights[(layer, module)] = (a.to(device, dtype),
                                                    (b.to(torch.float32) * spec.scale).to(device, dtype))
    return adapter


def save_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                 target_modules: tuple[str, ...], base_model: str = "") -> Path:
    """Write a PEFT adapter directory (tensors keyed by `peft_key`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
           "target_modules": list(target_modules), "bias": "none", "fan_in_fan_out": False, "use_dora": False,
           "use_rslora": False, "base_model_name_or_path": base_model, "inference_mode": True,
           "init_lora_weights": True, "modules_to_save": None}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out


class LoRABatch:
    """The adapters of one step, stacked per (layer, module); see the module docstring for the maths.

    slots: the step's adapters in slot order; token_slots [T] (int64, -1 = base) says whose each token is;
    gather [S, Tmax] (or None): each slot's token rows, padded with row T, for the grouped path.
    """

    def __init__(self, slots: list[LoRAAdapter], stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                 token_slots: torch.Tensor, gather: torch.Tensor | None = None) -> None:
        self.slots = slots
        self.stacks = stacks  # (layer, module) -> A [S, r, in], B^T*scale [S, r, out] (zero-padded to r = max rank)
        self.token_slots = token_slots  # [T]
        self.gather = gather  # [S, Tmax] rows of x (T = the zero pad row), or None: the masked path
        self._mask: torch.Tensor | None = None  # [T, S*r], masked path

    @staticmethod
    def stack(slots: list[LoRAAdapter]) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Pad the slots' matrices to the largest rank and stack them per (layer, module) (once per adapter set).

        A slot that does not target a module (or has a smaller rank) contributes zero rows: exact zeros.
        """
        rank = max(a.spec.rank for a in slots)
        out = {}
        for key in sorted({k for a in slots for k in a.weights}):
            ref_a, ref_b = next(a.weights[key] for a in slots if key in a.weights)
            a_pad = ref_a.new_zeros(len(slots), rank, ref_a.shape[1])  # [S, r, in]
            bt_pad = ref_b.new_zeros(len(slots), rank, ref_b.shape[0])  # [S, r, out]
            for s, adapter in enumerate(slots):
                if key in adapter.weights:
                    a, b = adapter.weights[key]
                    a_pad[s, :a.shape[0]] = a
                    bt_pad[s, :a.shape[0]] = b.T
            out[key] = (a_pad, bt_pad)
        return out

    def delta(self, layer: int, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, in] -> the adapters' contribution [T, out] to `module`'s output (None: no adapter targets it)."""
        stack = self.stacks.get((layer, module))
        if stack is None:
            return None
        a_pad, bt_pad = stack
        n_slots, rank, d_out = bt_pad.shape
        if self.gather is not None:  # grouped (SGMV-like): each adapter's tokens times its own matrices
            t = x.shape[0]
            xs = torch.cat([x, x.new_zeros(1, x.shape[1])])[self.gather]  # [S, Tmax, in]
            d = torch.bmm(torch.bmm(xs, a_pad.transpose(1, 2)), bt_pad)  # [S, Tmax, r] -> [S, Tmax, out]
            out = x.new_zeros(t + 1, d_out)
            out[self.gather.reshape(-1)] = d.reshape(-1, d_out)  # padding lands on row T, dropped
            return out[:t]
        # masked: every token against every slot's columns, zero outside its own
        if self._mask is None:
            owner = torch.arange(n_slots, device=x.device).repeat_interleave(rank)  # [S*r]
            self._mask = (self.token_slots[:, None] == owner[None, :]).to(x.dtype)  # [T, S*r]
        xa = x @ a_pad.reshape(n_slots * rank, -1).T  # [T, S*r]
        return (xa * self._mask) @ bt_pad.reshape(n_slots * rank, d_out)  # [T, out]

    def add_packed(self, layer: int, modules: tuple[str, ...], sizes: list[int], x: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        """out [T, sum(sizes)] (a packed projection, e.g. q|k|v) plus each module's delta on its columns."""
        deltas = [self.delta(layer, m, x) for m in modules]
        if all(d is None for d in deltas):
            return out
        parts = [d if d is not None else out.new_zeros(out.shape[0], n) for d, n in zip(deltas, sizes, strict=True)]
        return out + torch.cat(parts, dim=-1)

    def add(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d = self.delta(layer, module, x)
        return out if d is None else out + d
