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
    if len(pen) == len(params):
        x = _penalties(x, params, histories, vocab)  # type: ignore[arg-type]
    elif pen:
        x[torch.tensor(pen, device=dev)] = _penalties(x[pen], [params[i] for i in pen],
                                                      [histories[i] for i in pen], vocab)  # type: ignore[misc]
    return x


def _penalised(sp: SamplingParams) -> bool:
    return bool(sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0)


def _padded(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [R, L] (each row padded with its own first id, or 0) and the mask of real entries [R, L]."""
    rows = [torch.tensor(s if len(s) else [0], dtype=torch.int64) for s in seqs]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device, non_blocking=True)
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    valid = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
    return torch.where(valid, ids, ids[:, :1]), valid


def _penalties(x: torch.Tensor, params: Sequence[SamplingParams], hist: Sequence[RowHistory],
               vocab: int) -> torch.Tensor:
    """Sparse: only the logits of tokens in a row's history change, so everything is O(rows x history)
    (gather / scatter at those ids), never a dense [rows, vocab] count."""
    dev = x.device  # x is the caller's own copy: changed in place
    if any(p.repetition_penalty != 1.0 for p in params):
        # every occurrence of a seen token gets the same new value, so duplicate writes agree
        ids, _ = _padded([list(h.prompt_ids) + list(h.output_ids) for h in hist], dev)
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
        seen = x.gather(1, ids)
        x.scatter_(1, ids, torch.where(seen > 0, seen / rep, seen * rep))
    out, valid = _padded([h.output_ids for h in hist], dev)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    x.scatter_add_(1, out, -freq * valid)  # once per occurrence
    # presence: once per distinct token = at the first of each run of equal ids in the sorted row
    srt, order = torch.where(valid, out, vocab).sort(dim=1)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    x.scatter_add_(1, out.gather(1, order), -pres * (first & valid.gather(1, order)))
    return x


_BYTE_BIAS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_bias(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each byte value, 0 where bit j is set and -inf where it is not."""
    t = _BYTE_BIAS.get((device, dtype))
    if t is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        t = _BYTE_BIAS[(device, dtype)] = torch.where(bits == 1, 0.0, float("-inf")).to(device, dtype)
    return t


def apply_token_bitmask(x: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> torch.Tensor:
    """Set x[rows[k], t] = -inf where bit t of bitmask[k] (int32 words, 32 tokens each) is 0.

    One table lookup turns each byte of the (little-endian) words into 8 additive biases (0 or -inf),
    then one add: no per-bit arithmetic, no boolean masked_fill (both far slower on a CPU)."""
    dev = x.device
    nbytes = bitmask.shape[1] * 4
    m = bitmask.contiguous().view(torch.uint8).to(dev, non_blocking=True).flatten().long()  # [R * 4W]
    bias = _byte_bias(dev, x.dtype).index_select(0, m).view(len(rows), nbytes * 8)  # [R, 32W]
    vocab = x.shape[1]
    if bias.shape[1] < vocab:  # tokens beyond the grammar's vocabulary are never allowed
        bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[1]), value=float("-inf"))
    bias = bias[:, :vocab]
    if len(rows) == x.shape[0] and list(rows) == list(range(x.shape[0])):
        return x.add_(bias)
    return x.index_add_(0, torch.tensor(list(rows), device=dev), bias)
