"""oneDNN-prepacked CPU linears: same outputs as `F.linear` (to fp32 rounding), same tokens in the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvfleet.dataplane.config import EngineConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.packed_linear import PackedLinear, pack_linears, packed_linear_available
from torch import nn

pytestmark = pytest.mark.skipif(not packed_linear_available(torch.float32), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 7, 32, 257])
def test_packed_linear_matches_f_linear(rows: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=True)
    packed = PackedLinear.wrap(lin)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        x3 = torch.randn(2, rows, 96)
        torch.testing.assert_close(packed(x3), F.linear(x3, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_packing_keeps_parameters_and_falls_back_after_an_in_place_change() -> None:
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4))
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert pack_linears(model) == 2
    assert pack_linears(model) == 0  # idempotent: already packed
    assert all(isinstance(m, PackedLinear) for m in (model[0], model[2]))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # the same tensors
    with torch.no_grad():
        model[2].weight.mul_(2.0)  # a stale packed copy must not be used
    x = torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), model[2].bias + F.relu(x @ model[0].weight.T) @ model[2].weight.T)


def _generate(model_dir: str, packed: bool) -> list[list[int]]:
    model, mc = load_model(model_dir, dtype=torch.float32, device="cpu")
    cfg = EngineConfig(model_dir=model_dir, dtype="float32", device="cpu", num_kv_blocks=64, max_num_seqs=4,
                       cpu_packed_linear=packed)
    engine = LLMEngine(model, mc, cfg, "cpu", torch.float32)
    assert any(isinstance(m, PackedLinear) for m in model.modules()) == packed
    prompts = [[5 + i, 17, 3 * i + 1, 40, 2] * (i + 1) for i in range(4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return [o.new_token_ids for o in engine.generate(prompts, params)]


def test_engine_tokens_equal_with_and_without_packed_linears(tiny_model_dir) -> None:
    assert _generate(str(tiny_model_dir), packed=True) == _generate(str(tiny_model_dir), packed=False)
