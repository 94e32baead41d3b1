"""Per-request logits processing for a batch: logit_bias, min_tokens, penalties, token masks.

Everything is applied to the whole batch with a handful of tensor ops (scatter, index_put,
where): the Python loops run over requests, bias entries and past tokens, never over the
vocabulary. Rows whose `SamplingParams` ask for nothing are not touched.

Order (as vLLM): logit_bias, min_tokens bans, then penalties, then the grammar mask:

    x[t] += bias[t]
    x[t]  = -inf                 for t in eos | stop_token_ids while fewer than min_tokens are out
    x[t]  = x[t] / r if x[t] > 0 else x[t] * r       for t seen in prompt or output (repetition r)
    x[t] -= frequency * count_out(t) + presence * (count_out(t) > 0)
    x[t]  = -inf                 where the grammar's bitmask bit of t is 0
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from kvfleet.dataplane.engine.api import SamplingParams


@dataclass(frozen=True, slots=True)
class RowHistory:
    """What penalties need to know about one row's sequence."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    banned: tuple[int, ...] = ()  # token ids banned at this step (min_tokens)


def row_history(sp: SamplingParams, token_ids: Sequence[int], num_prompt: int,
                eos_token_ids: Collection[int]) -> RowHistory | None:
    """The history a row needs, or None when its params ask for no processing."""
    if not sp.has_logits_processing:
        return None
    n_out = len(token_ids) - num_prompt
    banned: tuple[int, ...] = ()
    if n_out < sp.min_tokens:
        banned = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else tuple(eos_token_ids))
    rep = sp.repetition_penalty != 1.0
    pen = rep or sp.presence_penalty or sp.frequency_penalty
    return RowHistory(token_ids[:num_prompt] if rep else (), token_ids[num_prompt:] if pen else (), banned)


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   histories: Sequence[RowHistory | None]) -> torch.Tensor:
    """logits [N, V] float -> processed logits (a new tensor when anything applies)."""
    rows = [i for i, h in enumerate(histories) if h is not None]
    if not rows:
        return logits
    x = logits.clone()
    dev = x.device
    vocab = x.shape[1]
    bias_r: list[int] = []
    bias_t: list[int] = []
    bias_v: list[float] = []
    ban_r: list[int] = []
    ban_t: list[int] = []
    for i in rows:
        for t, b in params[i].logit_bias:
            bias_r.append(i)
            bias_t.append(t)
            bias_v.append(b)
        h = histories[i]
        assert h is not None
        ban_r += [i] * len(h.banned)
        ban_t += h.banned
    if bias_r:
        x.index_put_((torch.tensor(bias_r, device=dev), torch.tensor(bias_t, device=dev)),
                     torch.tensor(bias_v, device=dev, dtype=x.dtype), accumulate=True)
    if ban_r:
        x[torch.tensor(ban_r, device=dev), torch.tensor(ban_t, device=dev)] = float("-inf")
    pen = [i for i in rows if _penalised(params[i])]
    if pen:
        x[torch.tensor(pen, device=dev)] = _penalties(x[pen], [params[i] for i in pen],
                                                      [histories[i] for i in pen], vocab)  # type: ignore[misc]
    return x


def _penalised(sp: SamplingParams) -> bool:
    return bool(sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0)


def _counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] occurrence counts of each row's tokens (one scatter over a padded [R, L] id matrix)."""
    width = max(1, max(len(s) for s in seqs))
    padded = [list(s) + [vocab] * (width - len(s)) for s in seqs]  # pad id = an extra, dropped column
    ids = torch.tensor(padded, dtype=torch.int64, device=device)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def _penalties(x: torch.Tensor, params: Sequence[SamplingParams], hist: Sequence[RowHistory],
               vocab: int) -> torch.Tensor:
    dev = x.device
    out = _counts([h.output_ids for h in hist], vocab, dev)  # [R, V]
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = (out > 0) | (_counts([h.prompt_ids for h in hist], vocab, dev) > 0)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    return x - freq * out - pres * (out > 0).to(x.dtype)


def apply_token_bitmask(x: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Set x[rows[k], t] = -inf where bit t of bitmask[k] (int32 words, 32 tokens each) is 0."""
    dev = x.device
    bits = torch.arange(32, device=dev, dtype=torch.int32)
    m = bitmask.to(dev, non_blocking=True)
    allowed = ((m[:, :, None] >> bits) & 1).bool().flatten(1)  # [R, 32 * W]
    vocab = x.shape[1]
    if allowed.shape[1] < vocab:  # tokens beyond the grammar's vocabulary are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    idx = torch.tensor(list(rows), device=dev)
    x[idx] = x[idx].masked_fill(~allowed[:, :vocab], float("-inf"))
    return x
