"""The seam between the model and the KV cache.

The model works on a *flat* batch: all tokens of all scheduled sequences are
concatenated along one axis of length T (varlen, as vLLM does). Each decoder
layer computes q, k, v for those T tokens (RoPE already applied) and hands
them to an `AttentionBackend`, which owns where KV lives (a dense tensor for a
single sequence, paged blocks for the engine, quantized blocks for a cache
policy) and returns the attention output.

    q: [T, n_heads, head_dim]   k, v: [T, n_kv_heads, head_dim]   -> [T, n_heads, head_dim]

Keeping the model ignorant of paging is what lets the engine, cache policies
(quantization, eviction) and parity tests share one model implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionBackend(ABC):
    """Stores this step's K/V and attends over each sequence's full context.

    Contract:
    - called once per layer per forward, in layer order, with the same T;
    - must store k/v for the T new tokens before attending (a token attends
      to itself and to every earlier token of its own sequence, never to
      another sequence's tokens);
    - positions of the T tokens were fixed by the caller (RoPE is applied).
    """

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]."""


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Grouped-query causal attention of one sequence.

    q [Tq, Hq, D] are the last Tq positions of a context whose keys/values are
    k, v [Tk, Hkv, D] (Tk = q_offset + Tq). Returns [Tq, Hq, D].
    """
    tq = q.shape[0]
    tk = k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [Hq, Tq, D], [Hkv, Tk, D]
    if q_offset == 0:  # the whole context is new: SDPA's own causal mask (queries and keys aligned)
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        return out.transpose(0, 1)  # [Tq, Hq, D]
    # mask[i, j] = key j is visible to query i (query i sits at position q_offset + i)
    q_pos = torch.arange(q_offset, q_offset + tq, device=q.device)[:, None]
    k_pos = torch.arange(tk, device=q.device)[None, :]
    mask = k_pos <= q_pos  # [Tq, Tk]
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1)  # [Tq, Hq, D]


class DenseAttention(AttentionBackend):
    """One sequence, whole context in one forward, optional growing dense cache.

    The reference backend: parity tests against `transformers` and simple
    greedy generation use it. Not for serving.
    """

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        offset = self.k[layer].shape[0] if layer in self.k else 0
        self.k[layer] = k if offset == 0 else torch.cat([self.k[layer], k])
        self.v[layer] = v if offset == 0 else torch.cat([self.v[layer], v])
        return causal_attention(q, self.k[layer], self.v[layer], q_offset=offset)
