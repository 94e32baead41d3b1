"""Engine test helpers: a stand-in tiny Llama and a dense greedy reference."""

from __future__ import annotations

import torch
from kvfleet.dataplane.model.attention import AttentionBackend, DenseAttention


class StandInLlama(torch.nn.Module):
    """Minimal GQA transformer with RoPE; forward(input_ids[T], positions[T], attn) -> hidden[T, H]."""

    def __init__(self, vocab=97, hidden=32, layers=2, heads=4, kv_heads=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hd = hidden // heads
        self.heads, self.kv_heads = heads, kv_heads

        def w(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.3)

        self.emb = w(vocab, hidden)
        self.qkv = torch.nn.ParameterList([w(hidden, (heads + 2 * kv_heads) * self.hd) for _ in range(layers)])
        self.o = torch.nn.ParameterList([w(heads * self.hd, hidden) for _ in range(layers)])
        self.lm = w(hidden, vocab)

    def _rope(self, x, pos):
        half = self.hd // 2
        freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
        ang = pos[:, None].float() * freq[None, :]  # [T, half]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, input_ids, positions, attn: AttentionBackend):
        h = self.emb[input_ids]  # [T, H]
        t = h.shape[0]
        for i, (wqkv, wo) in enumerate(zip(self.qkv, self.o, strict=True)):
            x = torch.nn.functional.rms_norm(h, (h.shape[-1],))
            q, k, v = (x @ wqkv).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
            q = self._rope(q.view(t, self.heads, self.hd), positions)
            k = self._rope(k.view(t, self.kv_heads, self.hd), positions)
            h = h + attn.attend(i, q, k, v.view(t, self.kv_heads, self.hd)).reshape(t, -1) @ wo
        return torch.nn.functional.rms_norm(h, (h.shape[-1],))

    def compute_logits(self, hidden):
        return hidden @ self.lm


def dense_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: greedy decoding with the dense backend, one sequence at a time."""
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
