"""KV eviction under a token budget: StreamingLLM, H2O, SnapKV, KeyDiff.

Every policy reduces to the same two steps, which is what lets the paged
engine reuse them: *score* each stored token per kv head (`[N, Hkv]`, higher =
keep), then `select_keep(scores, protected, k)` -> `idx [k, Hkv]`, ascending per
head. Protected tokens (attention sinks, the recent window, and whatever the
quantizer keeps in full precision) are always kept.

    streaming-llm  score = position                      (sinks + most recent)
    h2o            score = accumulated attention received (heavy hitters + window)
    snapkv         score = max-pooled attention of the last W queries (after prefill)
    keydiff        score = -cos(key, mean key of the head) (no attention weights)
    lookahead      score = attention of M learned lookahead tokens after the prompt (LookaheadKV,
                   `lookahead.py`; prompt compression, once, in the evaluator and the paged engine)

Positions live inside post-RoPE keys, so dropping a token is just dropping its
row; kept keys keep their original rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EVICTION_POLICIES = ("none", "streaming-llm", "h2o", "snapkv", "keydiff", "lookahead")
# scored once by a trained module after the prompt (`lookahead.py`): the paged engine and the teacher-forced
# evaluator apply it; `PolicyAttention` (which ingests tokens without the model) does not
PROMPT_SCORED = ("lookahead",)
PYRAMID_SPREAD = 0.5  # first layer gets (1 + spread) x budget, last (1 - spread) x budget


@dataclass(frozen=True)
class EvictionSpec:
    """What to drop and how much to keep (per sequence, per layer)."""

    policy: str = "none"
    budget_tokens: int | None = None
    budget_ratio: float | None = None
    window_tokens: int = 32
    sink_tokens: int = 4
    observation_window: int = 32
    pooling_kernel: int = 7
    pyramid: bool = False
    slack_tokens: int = 0  # hysteresis: once over budget, evict down to budget - slack (>= protected)
    chunk_tokens: int = 0  # prompt compression keeps whole aligned chunks of this many tokens (0: single tokens)

    def __post_init__(self) -> None:
        if self.policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction policy {self.policy!r} not in {EVICTION_POLICIES}")
        if self.policy == "none":
            if self.budget_tokens is not None or self.budget_ratio is not None:
                raise ValueError("eviction policy none takes no budget")
            return
        if (self.budget_tokens is None) == (self.budget_ratio is None):
            raise ValueError(f"eviction {self.policy}: set exactly one of budgetTokens or budgetRatio")
        if self.window_tokens < 0 or self.sink_tokens < 0:
            raise ValueError("windowTokens and sinkTokens must be >= 0")
        if self.budget_tokens is not None and self.budget_tokens <= self.sink_tokens + self.window_tokens:
            raise ValueError(f"eviction {self.policy}: budgetTokens {self.budget_tokens} must exceed "
                             f"sinkTokens {self.sink_tokens} + windowTokens {self.window_tokens}")
        if self.budget_ratio is not None and not 0.0 < self.budget_ratio <= 1.0:
            raise ValueError(f"budgetRatio must be in (0, 1], got {self.budget_ratio}")
        if self.pooling_kernel < 1 or self.pooling_kernel % 2 == 0:
            raise ValueError(f"poolingKernel must be odd and >= 1, got {self.pooling_kernel}")
        if self.observation_window < 1:
            raise ValueError("observationWindow must be >= 1")
        if self.slack_tokens < 0:
            raise ValueError("slackTokens must be >= 0")
        if self.chunk_tokens < 0:
            raise ValueError("chunkTokens must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    def layer_budget(self, layer: int, num_layers: int, seen: int, min_keep: int) -> int:
        """Tokens layer `layer` may keep after `seen` tokens; never below `min_keep` (protected)."""
        if self.budget_tokens is not None:
            base = float(self.budget_tokens)
        else:
            assert self.budget_ratio is not None
            base = self.budget_ratio * seen
        if self.pyramid and num_layers > 1:
            base *= 1.0 + PYRAMID_SPREAD * (1.0 - 2.0 * layer / (num_layers - 1))
        return max(int(math.ceil(base)), min_keep)

    def evict_to(self, budget: int, min_keep: int) -> int:
        """Tokens to keep when over `budget`: `budget - slack_tokens`, never below `min_keep`.

        With slack, eviction runs once per `slack_tokens` new tokens instead of every step
        (the paged engine uses its block size: one compaction per block of new tokens).
        """
        return max(budget - self.slack_tokens, min_keep)


# -- selection ----------------------------------------------------------------


def protected_mask(pos: torch.Tensor, seen: int, sink_tokens: int, window_tokens: int) -> torch.Tensor:
    """pos [N, H] token positions -> [N, H] bool: an attention sink or in the recent window."""
    return (pos < sink_tokens) | (pos >= seen - window_tokens)


def select_keep(scores: torch.Tensor, protected: torch.Tensor, k: int) -> torch.Tensor:
    """scores/protected [N, H] -> idx [k, H] of the rows to keep, ascending per head.

    Protected rows always win; the rest by descending score (ties: the later row).
    """
    n, _ = scores.shape
    if k >= n:
        return torch.arange(n, device=scores.device)[:, None].expand_as(scores).contiguous()
    n_prot = int(protected.sum(0).max())
    if n_prot > k:
        raise ValueError(f"budget {k} is smaller than the {n_prot} protected tokens (sinks + window + "
                         "full-precision tokens); raise the budget or shrink windowTokens/residualTokens")
    tie = torch.arange(n, device=scores.device, dtype=torch.float32)[:, None] * 1e-9
    s = scores.float() + tie
    s = s.masked_fill(protected, float("inf"))
    idx = s.topk(k, dim=0).indices  # [k, H]
    return idx.sort(dim=0).values


def select_chunks(scores: torch.Tensor, protected: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Like `select_keep`, but whole chunks of `chunk` rows aligned at multiples of `chunk` (a quantizer's
    token groups, so per-channel scales move with their rows): idx [k', H], ascending per head.

    A chunk with a protected row is kept whole; the other chunks (all full: the last, partial chunk
    holds the most recent rows, which the window protects) by their summed score, as many as bring the
    kept rows closest to k. Every head keeps the same number of rows k'."""
    n, h = scores.shape
    nc, pad = -(-n // chunk), -n % chunk
    chunk_scores = F.pad(scores.float().T, (0, pad)).view(h, nc, chunk).sum(-1).T  # [nc, H]
    chunk_prot = F.pad(protected.T, (0, pad)).view(h, nc, chunk).any(-1).T  # [nc, H]
    if not bool(chunk_prot[-1].all()) and pad:
        raise ValueError("the last, partial chunk must be protected (a window at least as long as it)")
    prot_rows = int(chunk_prot.sum(0).max()) * chunk - pad  # same for every head: protection is by position
    extra = max(0, round((k - prot_rows) / chunk))
    kc = min(nc, int(chunk_prot.sum(0).max()) + extra)
    cidx = select_keep(chunk_scores, chunk_prot, kc)  # [kc, H] ascending
    rows = (cidx[:, None, :] * chunk + torch.arange(chunk, device=scores.device)[None, :, None]).flatten(0, 1)
    return rows[: rows.shape[0] - pad]  # [k', H]: the partial last chunk (always kept) has no padding rows


# -- scores -------------------------------------------------------------------


def streaming_scores(pos: torch.Tensor) -> torch.Tensor:
    """StreamingLLM: the most recent tokens win (sinks are protected). pos [N, H] -> [N, H]."""
    return pos.float()


def keydiff_scores(keys: torch.Tensor) -> torch.Tensor:
    """KeyDiff: keys [N, H, D] -> [N, H] = -cos(key, mean key of its head); distinct keys win."""
    anchor = F.normalize(keys.float(), dim=-1).mean(0, keepdim=True)  # [1, H, D]
    return -F.cosine_similarity(keys.float(), anchor, dim=-1)


def attention_probs(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(D)) per query head.

    q [Tq, Hq, D], k [Tk, Hkv, D], visible [Hkv or 1, Tq, Tk] bool -> probs [Hq, Tq, Tk] (float32).
    """
    tq, hq, d = q.shape
    hkv = k.shape[1]
    qh = q.float().view(tq, hkv, hq // hkv, d).permute(1, 2, 0, 3)  # [Hkv, G, Tq, D]
    kh = k.float().permute(1, 2, 0)  # [Hkv, D, Tk]
    logits = (qh @ kh[:, None]) / math.sqrt(d)  # [Hkv, G, Tq, Tk]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return logits.softmax(-1).reshape(hq, tq, -1)


def received_attention(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """probs [Hq, Tq, Tk] -> [Tk, Hkv]: attention each key received, summed over queries and the GQA group."""
    hq, tq, tk = probs.shape
    return probs.view(num_kv_heads, hq // num_kv_heads, tq, tk).sum((1, 2)).T


def h2o_prompt_scores(q: torch.Tensor, keys: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """H2O after a prefill: attention each prompt row received from every prompt query (causal).

    q [P, Hq, D], keys [P, Hkv, D] -> [P, Hkv], computed `chunk` queries at a time."""
    p, hkv = keys.shape[:2]
    acc = torch.zeros(p, hkv)
    for c0 in range(0, p, chunk):
        c1 = min(p, c0 + chunk)
        visible = (torch.arange(c1)[None, :] <= torch.arange(c0, c1)[:, None])[None]  # [1, C, c1]
        acc[:c1] += received_attention(attention_probs(q[c0:c1], keys[:c1], visible), hkv)
    return acc


def snapkv_scores(q_win: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, k_pos: torch.Tensor,
                  kernel: int) -> torch.Tensor:
    """SnapKV: votes of the observation-window queries, max-pooled along the sequence.

    q_win [W, Hq, D] at positions q_pos [W]; keys [N, Hkv, D] at k_pos [N, Hkv] -> [N, Hkv].
    """
    visible = k_pos.T[:, None, :] <= q_pos[None, :, None]  # [Hkv, W, N]
    votes = received_attention(attention_probs(q_win, keys, visible), keys.shape[1])  # [N, Hkv]
    return pool_rows(votes, kernel)


def pool_rows(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """scores [N, H] -> [N, H] max-pooled along the rows (a kept row keeps its neighbours' chance)."""
    if kernel <= 1:
        return scores
    return F.max_pool1d(scores.T[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0].T


# -- per-sequence policy state ---------------------------------------------------


class EvictionState:
    """One sequence's eviction state across layers (H2O scores, SnapKV query window).

    The owner (a KV store) calls, per layer and forward:
      observe(layer, q, q_pos, probs)   after attending (probs only if `needs_probs`)
      scores(layer, keys, pos, seen)    when over budget -> [N, Hkv]
      evicted(layer, keep_idx)          after dropping rows
    """

    def __init__(self, spec: EvictionSpec) -> None:
        self.spec = spec
        self.acc: dict[int, torch.Tensor] = {}  # h2o: [N, Hkv] accumulated attention
        self.q_win: dict[int, torch.Tensor] = {}  # snapkv: [<=W, Hq, D] last queries
        self.q_pos: dict[int, torch.Tensor] = {}  # snapkv: [<=W]
        self.prefilled: set[int] = set()

    @property
    def needs_probs(self) -> bool:
        """H2O needs every query's attention probabilities, so attention is computed explicitly."""
        return self.spec.policy == "h2o"

    def observe(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor, probs: torch.Tensor | None,
                num_kv_heads: int) -> None:
        """q [T, Hq, D] at q_pos [T]; probs [Hq, T, N] over all N stored tokens (h2o)."""
        if self.spec.policy == "h2o":
            assert probs is not None
            got = received_attention(probs, num_kv_heads)  # [N, Hkv]
            old = self.acc.get(layer)
            if old is not None:
                got[: old.shape[0]] += old
            self.acc[layer] = got
        elif self.spec.policy == "snapkv":
            w = self.spec.observation_window
            qs = q[-w:] if layer not in self.q_win else torch.cat([self.q_win[layer], q])[-w:]
            ps = q_pos[-w:] if layer not in self.q_pos else torch.cat([self.q_pos[layer], q_pos])[-w:]
            self.q_win[layer], self.q_pos[layer] = qs, ps

    def scores(self, layer: int, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """keys [N, Hkv, D] (dequantized, post-RoPE), pos [N, Hkv] -> scores [N, Hkv]."""
        p = self.spec.policy
        if p == "streaming-llm":
            return streaming_scores(pos)
        if p == "keydiff":
            return keydiff_scores(keys)
        if p == "h2o":
            return self.acc[layer]
        if p == "snapkv":
            return snapkv_scores(self.q_win[layer], self.q_pos[layer], keys, pos, self.spec.pooling_kernel)
        raise AssertionError(p)

    def evicted(self, layer: int, keep: torch.Tensor) -> None:
        """keep [k, Hkv] rows survived; re-index per-token state."""
        if layer in self.acc:
            self.acc[layer] = self.acc[layer].gather(0, keep)

    def nbytes(self) -> int:
        """Bookkeeping bytes (not KV): H2O scores and SnapKV's query window."""
        ts = list(self.acc.values()) + list(self.q_win.values()) + list(self.q_pos.values())
        return sum(t.numel() * t.element_size() for t in ts)
