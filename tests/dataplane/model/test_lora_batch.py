"""LoRABatch's two exact paths (grouped bmm, masked matmul) against a per-token reference."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.model.lora import AdapterSpec, LoRAAdapter, LoRABatch


def _adapter(name: str, rank: int, modules: tuple[str, ...], gen: torch.Generator) -> LoRAAdapter:
    ad = LoRAAdapter(name, AdapterSpec(rank, 2.0 * rank, modules))
    for m in modules:  # B already scaled, as load_adapter stores it
        ad.weights[(0, m)] = (torch.randn(rank, 8, generator=gen), torch.randn(6, rank, generator=gen) * 2.0)
    return ad


@pytest.mark.parametrize("grouped", [True, False])
def test_both_paths_equal_the_per_token_reference(grouped: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    slots = [_adapter("a", 4, ("q_proj", "o_proj"), gen), _adapter("b", 2, ("q_proj",), gen),
             _adapter("c", 8, ("o_proj",), gen)]
    token_slots = torch.tensor([-1, 0, 0, 2, 1, -1, 2, 2, 1])  # [T]: base tokens, uneven groups
    x = torch.randn(len(token_slots), 8, generator=gen)
    gather = None
    if grouped:
        rows = [[i for i, s in enumerate(token_slots.tolist()) if s == k] for k in range(3)]
        tmax = max(map(len, rows))
        gather = torch.tensor([r + [len(token_slots)] * (tmax - len(r)) for r in rows])
    batch = LoRABatch(slots, LoRABatch.stack(slots), token_slots, gather)
    for module in ("q_proj", "o_proj"):
        want = torch.zeros(len(token_slots), 6)
        for i, s in enumerate(token_slots.tolist()):
            if s >= 0 and (0, module) in slots[s].weights:
                a, b = slots[s].weights[(0, module)]
                want[i] = b @ (a @ x[i])
        assert torch.allclose(batch.delta(0, module, x), want, atol=1e-5)
    assert batch.delta(0, "v_proj", x) is None and batch.delta(1, "q_proj", x) is None
