"""LookaheadKV: learned lookahead tokens that predict which prompt rows future queries will read.

After a prompt of P tokens is prefilled, M learned *lookahead tokens* run through the frozen model at
positions P..P+M-1 over the prompt's stored K/V. Their input embeddings are learned and their q/k/v
projections get a low-rank update (LoRA, only for these tokens), so their queries depend on the prompt
(they attend to it in every layer) without generating a draft. Their attention on the prompt rows,
summed over the M queries and each kv head's query group, is the score `[P, Hkv]` per layer; the caller
max-pools it and keeps the top rows with `eviction.select_keep` exactly as it does SnapKV's
observation-window votes. Cost: one forward of M tokens over the stored KV (no observation window).

Shapes: L layers, P prompt tokens, M lookahead tokens, H hidden, Hq/Hkv heads, D head dim, r rank.

The module is trained (`kvfleet.tools.lookahead_train`) to match, per layer and kv head, the
attention that the next N teacher-forced tokens put on the prompt rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.attention import AttentionBackend
from .eviction import attention_probs, pool_rows, received_attention
from .paged_eviction import PromptScorer


@dataclass(frozen=True)
class LookaheadConfig:
    """Size of the lookahead module (what a checkpoint was built with)."""

    num_tokens: int = 8  # M
    rank: int = 8  # r of the q/k/v update
    alpha: float = 16.0  # update scale = alpha / rank


class _QKVDelta:
    """Duck-typed `LoRABatch`: a low-rank update of the packed q|k|v projection, nothing else."""

    def __init__(self, mod: LookaheadKV) -> None:
        self.mod = mod

    def add_packed(self, layer: int, names: tuple[str, ...], sizes: list[int], x: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        """x [M, H], out [M, Q+2KV] -> out + scale * (x A^T) B^T on q|k|v (other projections unchanged)."""
        if names[0] != "q_proj":
            return out
        m = self.mod
        a, b = m.lora_a[layer].to(x.dtype), m.lora_b[layer].to(x.dtype)  # a bfloat16 engine: its dtype
        return out + m.scale * (x @ a.T) @ b.T

    def add(self, layer: int, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out


class _OverPrompt(AttentionBackend):
    """The lookahead tokens attend over the prompt's stored K/V and causally over themselves;
    records the attention each prompt row receives per kv head."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values  # per layer [P, Hkv, D] (post-RoPE)
        self.mass: list[torch.Tensor] = []  # per layer [P, Hkv]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [M, Hq, D]; k, v [M, Hkv, D]
        p, m, hkv = self.keys[layer].shape[0], q.shape[0], k.shape[1]
        k_all = torch.cat([self.keys[layer].to(k.dtype), k])  # [P+M, Hkv, D]
        v_all = torch.cat([self.values[layer].to(v.dtype), v])
        visible = torch.ones(1, m, p + m, dtype=torch.bool)
        visible[0, :, p:] = torch.ones(m, m, dtype=torch.bool).tril()
        probs = attention_probs(q, k_all, visible)  # [Hq, M, P+M]
        self.mass.append(received_attention(probs[:, :, :p], hkv))  # [P, Hkv]
        hq = q.shape[1]
        vh = v_all.float().permute(1, 0, 2).repeat_interleave(hq // hkv, dim=0)  # [Hq, P+M, D]
        return (probs @ vh).transpose(0, 1).to(q.dtype)  # [M, Hq, D]


class LookaheadKV(nn.Module):
    """Learned lookahead embeddings [M, H] and a rank-r q|k|v update per layer ([L, r, H], [L, Q+2KV, r])."""

    def __init__(self, model_cfg: Any, cfg: LookaheadConfig = LookaheadConfig(), seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        h, n_layers = model_cfg.hidden_size, model_cfg.num_hidden_layers
        out = model_cfg.q_size + 2 * model_cfg.kv_size
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(cfg.num_tokens, h, generator=g) * 0.02)  # [M, H]
        self.lora_a = nn.Parameter(torch.randn(n_layers, cfg.rank, h, generator=g) / math.sqrt(h))  # [L, r, H]
        self.lora_b = nn.Parameter(torch.zeros(n_layers, out, cfg.rank))  # [L, Q+2KV, r]: starts as the base
        self.scale = cfg.alpha / cfg.rank

    def init_embeddings(self, model: Any, token_ids: list[int]) -> None:
        """Start the lookahead embeddings from real token embeddings (cycled over `token_ids`)."""
        with torch.no_grad():
            e = model.embed(torch.tensor([token_ids[i % len(token_ids)] for i in range(self.cfg.num_tokens)]))
            self.embed.copy_(e.float())

    def mass(self, model: Any, keys: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Attention the lookahead queries put on each prompt row: per layer [P, Hkv] (float32).

        keys/values: per layer [P, Hkv, D], post-RoPE, as stored after the prefill. Differentiable in
        this module's parameters (the model's own weights are used as they are)."""
        p = keys[0].shape[0]
        backend = _OverPrompt(keys, values)
        pos = torch.arange(p, p + self.cfg.num_tokens)
        model.run_layers(self.embed.to(keys[0].dtype), pos, backend, lora=_QKVDelta(self))  # type: ignore[arg-type]
        return backend.mass

    @torch.no_grad()
    def scores(self, model: Any, keys: list[torch.Tensor], values: list[torch.Tensor],
               kernel: int = 1) -> list[torch.Tensor]:
        """Eviction scores per layer [P, Hkv]: `mass`, max-pooled along the sequence like SnapKV's votes."""
        return [pool_rows(m, kernel) for m in self.mass(model, keys, values)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- checkpoint ---------------------------------------------------------------

    def save(self, out_dir: Path, record: dict[str, Any]) -> None:
        """`lookahead.pt` (tensors) and `lookahead.json` (config + the caller's provenance)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in self.state_dict().items()}, out_dir / "lookahead.pt")
        (out_dir / "lookahead.json").write_text(json.dumps({"config": asdict(self.cfg), **record}, indent=2))

    def prompt_scorer(self, model: Any) -> PromptScorer:
        """`mass` over `model` as the paged engine's `PagedEvictor` calls it (no autograd)."""
        def score(keys: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
            with torch.inference_mode():
                return self.mass(model, keys, values)
        return score

    @classmethod
    def load(cls, out_dir: Path, model_cfg: Any) -> LookaheadKV:
        """A module saved by `save`, for a model of `model_cfg`'s shape."""
        meta = json.loads((out_dir / "lookahead.json").read_text())
        mod = cls(model_cfg, LookaheadConfig(**meta["config"]))
        mod.load_state_dict(torch.load(out_dir / "lookahead.pt", weights_only=True))
        mod.requires_grad_(False)
        return mod


def lookahead_scorer(cp: Any, model: Any, model_config: Any, device: torch.device | str) -> PromptScorer | None:
    """The paged engine's prompt scorer under CachePolicyConfig `cp`: the module at `cp.lookahead_dir`
    running over `model` (None unless eviction is lookahead)."""
    if cp.eviction != "lookahead":
        return None
    return LookaheadKV.load(Path(cp.lookahead_dir), model_config).to(device).prompt_scorer(model)
