"""Token sampling for a batch of sequences with per-request parameters.

Greedy (temperature 0), temperature, top-k, top-p, per-request seeds and
logprobs, after the per-request processing of `logits_process.py` (logit_bias,
min_tokens, penalties, a grammar's token mask). Logprobs are always those of the
model's own distribution (before any of that), as in vLLM. Sampling uses the exponential-race trick: `argmax(p / E)` with
`E ~ Exp(1)` i.i.d. is a draw from `p`. A request with a seed owns a
`torch.Generator` and draws its own E row, so its tokens do not depend on
which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from kvfleet.dataplane.engine.api import SamplingParams, TokenLogprob
from kvfleet.dataplane.engine.logits_process import RowHistory, apply_token_bitmask, process_logits


@dataclass
class SampleResult:
    """Sampled token ids [N] (on CPU, as a list) and optional logprobs per row."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None],
           histories: Sequence[RowHistory | None] | None = None,
           mask: tuple[Sequence[int], torch.Tensor] | None = None) -> SampleResult:
    """logits [N, V] (any float dtype) -> one token per row.

    histories: per row, what logit_bias / min_tokens / penalties need (None = nothing to do).
    mask: (rows, int32 bitmask [len(rows), ceil(V / 32)]): a grammar's allowed tokens for those rows.
    """
    n = logits.shape[0]
    logits = logits.float()
    x = process_logits(logits, params, histories) if histories is not None else logits
    if mask is not None and len(mask[0]):
        x = apply_token_bitmask(x.clone() if x is logits else x, mask[0], mask[1])
    greedy = [p.temperature == 0 or p.top_k == 1 for p in params]
    if all(greedy):
        tokens = x.argmax(dim=-1)  # [N]
    else:
        tokens = _sample_random(x, params, generators, greedy)
    want = [p.logprobs for p in params]
    if not any(w is not None for w in want):
        return SampleResult(tokens.tolist(), [None] * n)
    return _with_logprobs(logits, tokens, want)


def _sample_random(logits: torch.Tensor, params: Sequence[SamplingParams],
                   generators: Sequence[torch.Generator | None], greedy: list[bool]) -> torch.Tensor:
    dev = logits.device
    n, vocab = logits.shape
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    x = logits / temps[:, None]  # [N, V]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sx, idx = x.sort(dim=-1, descending=True)  # [N, V]
        if any(k < vocab for k in top_k):
            ks = torch.tensor(top_k, device=dev)
            sx.masked_fill_(torch.arange(vocab, device=dev)[None, :] >= ks[:, None], float("-inf"))
        if any(p < 1.0 for p in top_p):
            ps = torch.softmax(sx, dim=-1)
            # drop a token when the mass before it already reaches top_p (the best one always stays)
            before = ps.cumsum(dim=-1) - ps
            sx.masked_fill_(before >= torch.tensor(top_p, device=dev)[:, None], float("-inf"))
        x = torch.empty_like(x).scatter_(-1, idx, sx)
    probs = torch.softmax(x, dim=-1)
    race = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        if len(unseeded) == n:
            race.exponential_()
        else:
            rows = torch.tensor(unseeded, device=dev)
            race[rows] = torch.empty((len(unseeded), vocab), device=dev).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            race[i].exponential_(generator=g)
    sampled = (probs / race).argmax(dim=-1)
    if any(greedy):
        sampled = torch.where(torch.tensor(greedy, device=dev), logits.argmax(dim=-1), sampled)
    return sampled


def _with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, want: list[int | None]) -> SampleResult:
    lp = torch.log_softmax(logits, dim=-1)  # [N, V]: the model's distribution, before sampling knobs
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    k = max(w or 0 for w in want)
    top_v, top_i = (lp.topk(k, dim=-1) if k > 0 else (None, None))
    top_vl = top_v.tolist() if top_v is not None else None
    top_il = top_i.tolist() if top_i is not None else None
    toks = tokens.tolist()
    out: list[TokenLogprob | None] = []
    for r, w in enumerate(want):
        if w is None:
            out.append(None)
            continue
        top = tuple(zip(top_il[r][:w], top_vl[r][:w], strict=True)) if w and top_il and top_vl else ()
        out.append(TokenLogprob(toks[r], chosen[r], top))
    return SampleResult(toks, out)
