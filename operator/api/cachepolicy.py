"""CachePolicy: how KV is stored, what is evicted, what is shared — composable by design."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .common import NAME_RULE, KubeModel, ReferencedStatus, Resource, Rule
from .shapes import HOST_PATH, NO_DOT_SEGMENTS

KVDType = Literal["none", "fp8", "int8", "int4", "int3", "int2"]
Granularity = Literal["per-tensor", "per-head", "per-channel", "per-token"]
# A directory as the engine pod sees it: absolute and normalised, like a ModelVariant's hostPath.
PodPath = Annotated[str, Field(max_length=4096, pattern=HOST_PATH), NO_DOT_SEGMENTS]


class Quantization(KubeModel):
    """KV quantization: keys per-channel (KIVI/KVQuant), values per-token, recent and sink tokens kept exact.

    The serving engine applies every field as `kvfleet eval-cache` does (the same tokens come out):
    token-grouped scales cover groupSize slots of the paged cache, and each running sequence keeps
    sinkTokens + residualTokens + groupSize - 1 tokens at full precision (counted in the KV budget).
    """

    dtype: KVDType = Field(
        default="none",
        description="Stored KV element type: none (model dtype), fp8 (e4m3), int8, int4 (two per byte), int3 "
        "(eight per three bytes), int2 (four per byte; KIVI-2). int3/int2 need a head dimension that is a "
        "multiple of 8 (the engine refuses others). Measured on SmolLM2-135M (bench/results/kv_policies.md: "
        "16,364 scored tokens of Bible and Python text at 1k-4k context, perplexity change vs a 16-bit cache "
        "with 95% intervals; keys per-channel and values per-token in groups of 32, sinkTokens 4, "
        "residualTokens 32): int8 1.76x -0.00% [-0.02, +0.01]; int4 3.13x +0.18% [+0.02, +0.33], the most "
        "compression within +2%; int3 3.89x +1.92% [+1.54, +2.30]; int2 5.12x +18.2% [+16.8, +19.7] "
        "(keysPreRope: int4 +0.25% [+0.10, +0.42], int3 +2.09% [+1.74, +2.44], int2 +17.5%). None reaches 8x "
        "within +2%: prompt compression to 40% on int4 (7.6x) costs +3.9% [+2.7, +5.5] with SnapKV, +3.5% "
        "[+2.5, +4.6] with H2O (passkey lost); to 70% (4.44x) +1.35% [+0.74, +2.25] with SnapKV and +1.41% "
        "[+0.93, +1.95] with lookahead keeping whole groups, the most compression within +2% (passkey 60/60).",
    )
    key_granularity: Granularity | None = Field(
        default=None,
        description="Scale granularity for keys. fp8: per-tensor, per-head (default; one scale per head per "
        "group of groupSize tokens) or per-token; int8/int4/int3/int2: per-channel (default; one scale per channel per "
        "group of groupSize tokens, KIVI) or per-token (one scale per token per groupSize channels). With an "
        "eviction policy the default is per-token, and only per-token is allowed (eviction compacts single "
        "tokens, which scales shared by a group of tokens cannot follow), except with lookahead, which then keeps "
        "whole groups of groupSize tokens per layer and KV head (their scales move with them).",
    )
    value_granularity: Granularity | None = Field(
        default=None,
        description="Scale granularity for values. fp8: per-tensor, per-head (default) or per-token; "
        "int8/int4/int3/int2: per-token (default; one scale per token per group of groupSize channels) or per-channel. "
        "With an eviction policy: per-token only (the default then), or any but per-tensor with lookahead.",
    )
    group_size: int = Field(
        default=32,
        ge=8,
        le=256,
        description="Elements sharing one scale: tokens for per-channel/per-head/per-tensor scales (then "
        "groupSize and blockSizeTokens divide one another), channels for per-token scales (then it divides "
        "the model's head dimension).",
    )
    keys_pre_rope: bool = Field(
        default=False,
        description="Quantize keys before rotary embedding (KVQuant); RoPE is re-applied on read at each "
        "kept token's original position. Measured on SmolLM2-135M: no gain at 4 or 3 bits (paired vs post-RoPE "
        "keys: int4 +0.07% [-0.08, +0.23], int3 +0.16% [-0.13, +0.47]).",
    )
    rotate_keys: bool = Field(
        default=False,
        description="Quantize each key after a fixed orthonormal rotation of its head dimension (a Hadamard "
        "matrix with seeded signs, QuaRot) and rotate it back on read: outlier channels are spread over the "
        "row, so per-token key scales, which eviction can move with their token, come closer to per-channel "
        "quality (SmolLM2-135M int4: +0.53% [+0.34, +0.73] vs +0.18% per-channel; no gain under eviction). "
        "Integer dtypes only.",
    )
    residual_tokens: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Most recent tokens kept in full precision (per-channel keys: plus the tokens of the "
        "incomplete group). Tokens a request takes from the prefix cache are read as stored.",
    )
    sink_tokens: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="First tokens (attention sinks) kept in full precision; they are left out of their "
        "group's scale. A request that takes them from the prefix cache gets their full-precision rows "
        "too (saved per cached prompt, as many prompts as running sequences); when they are gone the hit "
        "is not taken.",
    )

    __rules__ = (
        Rule(
            cel="self.dtype != 'fp8' || ((!has(self.keyGranularity) || self.keyGranularity != 'per-channel') "
            "&& (!has(self.valueGranularity) || self.valueGranularity != 'per-channel'))",
            message="fp8 supports per-tensor, per-head or per-token granularity",
            check=lambda s: s.dtype != "fp8" or "per-channel" not in (s.key_granularity, s.value_granularity),
            field_path=".dtype",
        ),
        Rule(
            cel="!(self.dtype in ['int8', 'int4', 'int3', 'int2']) || ((!has(self.keyGranularity) || "
            "self.keyGranularity in "
            "['per-channel', 'per-token']) && (!has(self.valueGranularity) || self.valueGranularity in "
            "['per-channel', 'per-token']))",
            message="int8/int4/int3/int2 support per-channel or per-token granularity only",
            check=lambda s: (
                s.dtype not in ("int8", "int4", "int3", "int2")
                or all(
                    g in (None, "per-channel", "per-token") for g in (s.key_granularity, s.value_granularity)
                )
            ),
            field_path=".dtype",
        ),
        Rule(
            cel="!(self.dtype in ['int4', 'int3', 'int2']) || self.groupSize % 2 == 0",
            message="int4/int3/int2 pack several values per byte: groupSize must be even",
            check=lambda s: s.dtype not in ("int4", "int3", "int2") or s.group_size % 2 == 0,
            field_path=".groupSize",
        ),
        Rule(
            cel="self.dtype != 'none' || (self.residualTokens == 0 && self.sinkTokens == 0 && !self.keysPreRope "
            "&& !has(self.keyGranularity) && !has(self.valueGranularity))",
            message="granularities, residualTokens, sinkTokens and keysPreRope need a quantized dtype",
            check=lambda s: (
                s.dtype != "none"
                or (
                    s.residual_tokens == 0
                    and s.sink_tokens == 0
                    and not s.keys_pre_rope
                    and s.key_granularity is None
                    and s.value_granularity is None
                )
            ),
            field_path=".dtype",
        ),
        Rule(
            cel="!self.rotateKeys || self.dtype in ['int8', 'int4', 'int3', 'int2']",
            message="rotateKeys needs an integer dtype (int8, int4, int3, int2)",
            check=lambda s: not s.rotate_keys or s.dtype in ("int8", "int4", "int3", "int2"),
            field_path=".rotateKeys",
        ),
    )


class Eviction(KubeModel):
    """KV eviction under a per-sequence token budget."""

    policy: Literal["none", "streaming-llm", "h2o", "snapkv", "keydiff", "lookahead"] = Field(
        default="none",
        description="none; streaming-llm (sinks + recent window); h2o (heavy hitters by accumulated attention "
        "+ window); snapkv (keys scored by the attention of the last observationWindow queries, max-pooled; "
        "first eviction once the whole prompt is computed); keydiff (keys least similar to the mean key); "
        "lookahead (LookaheadKV prompt compression: once the prompt is computed, a trained module's lookahead "
        "tokens read its stored KV and each layer and KV head keeps its best budgetRatio/budgetTokens share of "
        "the prompt, max-pooled by poolingKernel; decoded tokens are all kept; needs lookaheadDir; on "
        "SmolLM2-135M with int4 KIVI keys at budgetRatio 0.7: 4.44x, +1.41% [+0.93, +1.95] perplexity, "
        "passkey 60/60, bench/results/kv_policies.md). The serving "
        "engine applies the first four with one kept-token set per sequence shared by all layers and KV heads "
        "(scores summed over layers and KV heads); once over budget it evicts down to the budget minus one KV "
        "block, so compaction runs about once per block of new tokens; lookahead keeps one set per layer and KV "
        "head, as `kvfleet eval-cache` does (same tokens out); prefix blocks shared with other requests "
        "are never evicted. `kvfleet eval-cache` evaluates all five per layer and KV head.",
    )
    lookahead_dir: PodPath | None = Field(
        default=None,
        description="lookahead: the directory of the trained module as the engine pod sees it (lookahead.pt and "
        "lookahead.json, written by `kvfleet train-lookahead` for this ModelVariant's base model).",
    )
    budget_tokens: int | None = Field(default=None, ge=16, le=1048576, description="Tokens kept per sequence and layer (the serving engine keeps between budgetTokens minus "
        "one KV block and budgetTokens).")
    budget_ratio: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Fraction of a sequence's tokens kept (instead of budgetTokens).",
    )
    window_tokens: int = Field(default=32, ge=0, le=65536, description="Most recent tokens always kept.")
    sink_tokens: int = Field(
        default=4, ge=0, le=1024, description="First tokens always kept (attention sinks)."
    )
    observation_window: int = Field(default=32, ge=1, le=1024, description="snapkv: the last queries (the prompt's, then the most recent ones) that vote.")
    pooling_kernel: int = Field(
        default=7, ge=1, le=63, description="snapkv: 1-D max-pool width over scores (odd)."
    )
    pyramid: bool = Field(
        default=False,
        description="PyramidKV shape: larger budgets in lower layers, smaller in upper ones. Evaluated by "
        "`kvfleet eval-cache` only: the serving engine keeps one token set for all layers and refuses it (the "
        "fleet turns Degraded, InvalidConfig).",
    )

    __rules__ = (
        Rule(
            cel="self.policy == 'none' ? (!has(self.budgetTokens) && !has(self.budgetRatio)) : "
            "(has(self.budgetTokens) != has(self.budgetRatio))",
            message="set exactly one of budgetTokens or budgetRatio for an eviction policy (neither for none)",
            check=lambda s: (
                (s.budget_tokens is None and s.budget_ratio is None)
                if s.policy == "none"
                else ((s.budget_tokens is None) != (s.budget_ratio is None))
            ),
            field_path=".policy",
        ),
        Rule(
            cel="!has(self.budgetTokens) || self.budgetTokens > self.sinkTokens + self.windowTokens",
            message="budgetTokens must exceed sinkTokens + windowTokens",
            check=lambda s: s.budget_tokens is None or s.budget_tokens > s.sink_tokens + s.window_tokens,
            field_path=".budgetTokens",
        ),
        Rule(
            cel="self.policy != 'none' || !self.pyramid",
            message="pyramid is ignored without an eviction policy",
            check=lambda s: s.policy != "none" or not s.pyramid,
            field_path=".pyramid",
        ),
        Rule(
            cel="(self.policy == 'lookahead') == has(self.lookaheadDir)",
            message="lookaheadDir is set exactly when the policy is lookahead (its trained module)",
            check=lambda s: (s.policy == "lookahead") == (s.lookahead_dir is not None),
            field_path=".lookaheadDir",
        ),
        Rule(
            cel="self.poolingKernel % 2 == 1",
            message="poolingKernel must be odd",
            check=lambda s: s.pooling_kernel % 2 == 1,
            field_path=".poolingKernel",
        ),
    )


class PrefixCache(KubeModel):
    """Reuse of KV for shared prompt prefixes (hash chain over full blocks)."""

    enabled: bool = Field(default=True, description="Cache full KV blocks by prefix hash and reuse them.")
    scope: Literal["variant", "family"] = Field(
        default="variant",
        description="variant: hits only within one ModelVariant; family: across variants of one family, "
        "recomputing the layers each variant's kvSharing names (DroidSpeak).",
    )

    __rules__ = (
        Rule(
            cel="self.enabled || self.scope == 'variant'",
            message="scope family is ignored while the prefix cache is disabled: enable it or remove scope",
            check=lambda s: s.enabled or s.scope == "variant",
            field_path=".scope",
        ),
    )


class MemoryPool(KubeModel):
    """The fleet's shared KV memory pool (a separate role), keyed by prefix hash, family and codec."""

    enabled: bool = Field(
        default=False, description="Run the mempool role and offload/fetch KV blocks to it."
    )
    capacity_bytes: int = Field(
        default=0, ge=0, le=2**46, description="Total KV bytes the pool holds (all replicas; at most 64 TiB)."
    )
    high_watermark: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Start LRU eviction when usage crosses this fraction."
    )

    __rules__ = (
        Rule(
            cel="!self.enabled || self.capacityBytes > 0",
            message="capacityBytes must be > 0 when the pool is enabled",
            check=lambda s: not s.enabled or s.capacity_bytes > 0,
            field_path=".capacityBytes",
        ),
        Rule(
            cel="self.enabled || self.capacityBytes == 0",
            message="capacityBytes applies only to an enabled pool",
            check=lambda s: s.enabled or s.capacity_bytes == 0,
            field_path=".capacityBytes",
        ),
    )


class CachePolicySpec(KubeModel):
    """One KV cache policy; quantization, eviction, prefix caching and the pool compose."""

    block_size_tokens: Literal[8, 16, 32, 64, 128] = Field(
        default=16, description="Tokens per paged KV block."
    )
    quantization: Quantization = Field(
        default_factory=Quantization,
        description="How KV is stored (the serving engine and `kvfleet eval-cache` apply the same fields).",
    )
    eviction: Eviction = Field(default_factory=Eviction, description="What KV is dropped under a budget.")
    prefix_cache: PrefixCache = Field(default_factory=PrefixCache, description="Prefix reuse.")
    pool: MemoryPool = Field(default_factory=MemoryPool, description="Shared KV memory pool offload.")
    kv_cache_fraction: float = Field(
        default=0.8,
        gt=0.0,
        le=0.95,
        description="Fraction of accelerator memory left after weights given to KV.",
    )

    __rules__ = (
        Rule(
            cel="self.quantization.dtype == 'none' || self.blockSizeTokens % self.quantization.groupSize == 0 "
            "|| self.quantization.groupSize % self.blockSizeTokens == 0",
            message="quantization.groupSize and blockSizeTokens must divide one another",
            check=lambda s: s.quantization.dtype == "none" or s.block_size_tokens % s.quantization.group_size == 0
            or s.quantization.group_size % s.block_size_tokens == 0,
            field_path=".quantization.groupSize",
        ),
        Rule(
            cel="self.eviction.policy == 'none' || self.eviction.policy == 'lookahead' || "
            "self.quantization.dtype == 'none' || "
            "((!has(self.quantization.keyGranularity) || self.quantization.keyGranularity == 'per-token') && "
            "(!has(self.quantization.valueGranularity) || self.quantization.valueGranularity == 'per-token'))",
            message="with an eviction policy other than lookahead, quantization scales must be per-token (it "
            "compacts single tokens, which scales shared by a group of tokens cannot follow; lookahead keeps "
            "whole groups)",
            check=lambda s: s.eviction.policy in ("none", "lookahead") or s.quantization.dtype == "none"
            or all(g in (None, "per-token") for g in (s.quantization.key_granularity,
                                                      s.quantization.value_granularity)),
            field_path=".quantization",
        ),
        Rule(
            cel="self.eviction.policy == 'none' || self.quantization.dtype == 'none' || "
            "((!has(self.quantization.keyGranularity) || self.quantization.keyGranularity != 'per-tensor') && "
            "(!has(self.quantization.valueGranularity) || self.quantization.valueGranularity != 'per-tensor'))",
            message="with an eviction policy, per-tensor scales cannot move with one KV head's rows",
            check=lambda s: s.eviction.policy == "none" or s.quantization.dtype == "none"
            or "per-tensor" not in (s.quantization.key_granularity, s.quantization.value_granularity),
            field_path=".quantization",
        ),
        Rule(
            cel="self.eviction.policy == 'none' || (self.quantization.sinkTokens <= self.eviction.sinkTokens && "
            "self.quantization.residualTokens <= self.eviction.windowTokens)",
            message="with an eviction policy, quantization.sinkTokens must not exceed eviction.sinkTokens and "
            "quantization.residualTokens must not exceed eviction.windowTokens (full-precision tokens are never "
            "evicted)",
            check=lambda s: s.eviction.policy == "none" or (
                s.quantization.sink_tokens <= s.eviction.sink_tokens
                and s.quantization.residual_tokens <= s.eviction.window_tokens),
            field_path=".quantization",
        ),
        Rule(
            cel="self.eviction.policy != 'lookahead' || !self.quantization.keysPreRope",
            message="eviction lookahead keeps different tokens per layer and KV head; a pre-RoPE key would need a "
            "position per head and slot: use post-RoPE keys",
            check=lambda s: s.eviction.policy != "lookahead" or not s.quantization.keys_pre_rope,
            field_path=".quantization.keysPreRope",
        ),
        Rule(
            cel="self.eviction.policy == 'none' || !self.prefixCache.enabled || self.prefixCache.scope == 'variant'",
            message="eviction cannot be combined with family-scope prefix sharing (evicted KV is not shareable)",
            check=lambda s: (
                s.eviction.policy == "none" or not s.prefix_cache.enabled or s.prefix_cache.scope == "variant"
            ),
            field_path=".prefixCache.scope",
        ),
        Rule(
            cel="!self.prefixCache.enabled || self.prefixCache.scope == 'variant' || self.quantization.dtype == 'none'",
            message="family-scope prefix sharing needs unquantized KV: a sibling recomputes layers into the blocks "
            "it reuses, which quantized blocks (scales per token group, full-precision rows per sequence) do not "
            "support yet",
            check=lambda s: (
                not s.prefix_cache.enabled or s.prefix_cache.scope == "variant" or s.quantization.dtype == "none"
            ),
            field_path=".prefixCache.scope",
        ),
        Rule(
            cel="!self.pool.enabled || (self.eviction.policy == 'none' && self.quantization.sinkTokens == 0)",
            message="the memory pool shares prefixes as stored blocks: it cannot be combined with an eviction policy "
            "(evicted KV no longer holds its tokens) or with quantization.sinkTokens (the sinks' full-precision rows "
            "stay in the pod that computed them)",
            check=lambda s: not s.pool.enabled or (s.eviction.policy == "none" and s.quantization.sink_tokens == 0),
            field_path=".pool.enabled",
        ),
    )


class CachePolicy(Resource):
    """The whole CachePolicy object."""

    kind: Literal["CachePolicy"] = "CachePolicy"
    spec: CachePolicySpec = Field(default_factory=CachePolicySpec, description="Desired state.")
    status: ReferencedStatus | None = Field(
        default=None, description="Observed state, written by the operator."
    )

    __rules__ = (NAME_RULE,)
