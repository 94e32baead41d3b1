"""CPU linear layers with their weights prepacked once for oneDNN (what inductor's freezing does).

`F.linear` on CPU multiplies by the plain `[out, in]` weight every call; oneDNN's
`_linear_pointwise` with a weight reordered once into its blocked layout ran 1.5-2.5x faster
here (fp32, SmolLM2's shapes, M = 7..256 rows, AVX-512 Xeon, 1 thread), and the linear layers
are ~70% of a step (bench/results/engine_profile.md). Same fp32 arithmetic, another
summation order: outputs differ from `F.linear` by float rounding (~1e-6), like any GEMM swap.

`pack_linears(model)` swaps every plain `nn.Linear` of a CPU model for a `PackedLinear` that
shares its `weight`/`bias` parameters (state dict, weight tying and `isinstance(m, nn.Linear)`
unchanged) and keeps the packed copy next to them. It falls back to `F.linear` when the input
is not a CPU tensor of the packed dtype, or when the weight was changed in place since packing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BATCH_HINT = 32  # oneDNN's layout choice for the expected rows; any row count works with it


def packed_linear_available(dtype: torch.dtype) -> bool:
    """Whether this torch build can prepack CPU linear weights of `dtype`."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose forward uses a oneDNN-prepacked copy of its weight."""

    packed: torch.Tensor | None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> PackedLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight  # the same Parameter: tying and the state dict are unchanged
        new.bias = linear.bias
        new.packed, new._packed_version = None, -1
        new.repack()
        return new

    def repack(self) -> None:
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _BATCH_HINT)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.packed is None or x.device.type != "cpu" or x.dtype != w.dtype or w._version != self._packed_version:
            return F.linear(x, w, self.bias)
        if x.dim() == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Swap the plain `nn.Linear` modules of a CPU model for `PackedLinear`; returns how many."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or not packed_linear_available(first.dtype):
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == first.dtype]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear.wrap(child))
    return len(swaps)
