"""Engine test helpers: the dense greedy reference the paged engine must match."""

from __future__ import annotations

import torch
from kvfleet.dataplane.model.attention import DenseAttention


def dense_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the dense backend, one sequence at a time, no eos stop."""
    attn = DenseAttention()
    out: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor(prompt)
        pos = torch.arange(len(prompt))
        for _ in range(n):
            hidden = model.forward(ids, pos, attn)
            tok = int(model.compute_logits(hidden[-1:]).argmax(-1))
            out.append(tok)
            pos = pos[-1:] + 1
            ids = torch.tensor([tok])
    return out
