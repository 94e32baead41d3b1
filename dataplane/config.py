"""Engine configuration: frozen dataclasses, torch-free.

The operator renders an `EngineConfig` into a ConfigMap (`to_json()`), and
every dataplane role reads it back (`from_json()`). Both directions validate,
so a bad value fails in the operator's reconcile with a message naming the
field, not later inside a pod.

    cfg = EngineConfig(model_dir="/models/smollm2", slo_classes=(SLOClassConfig("chat", 500, 50),))
    EngineConfig.from_json(cfg.to_json()) == cfg
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")
CPU_KERNEL_MODES = ("auto", "on", "off")  # EngineConfig.cpu_kernels (dataplane/kernels/cpu.py)
QUANTIZATION_MODES = ("none", "fp16", "bf16", "fp8", "int8", "int4", "int3", "int2")  # kvcache/quant.py KV_DTYPES
EVICTION_MODES = ("none", "streaming-llm", "h2o", "snapkv", "keydiff", "lookahead")  # kvcache/eviction.py
GRANULARITIES = ("per-tensor", "per-head", "per-channel", "per-token")


SERVING_EVICTION_POLICIES = ("streaming-llm", "h2o", "snapkv", "keydiff", "lookahead")  # what the paged engine applies
INT_QUANTIZATION = ("int8", "int4", "int3", "int2")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class SLOClassConfig:
    """One SLO class as the engine sees it.

    priority: larger = more important (a tie-break after slack, and the first
    key when choosing a preemption victim). sheddable: the class may be
    rejected under overload.
    """

    name: str
    ttft_ms: float
    tpot_ms: float
    priority: int = 0
    sheddable: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name), "slo_classes[].name must be non-empty")
        _check(self.ttft_ms > 0, f"slo class {self.name!r}: ttft_ms must be > 0, got {self.ttft_ms}")
        _check(self.tpot_ms > 0, f"slo class {self.name!r}: tpot_ms must be > 0, got {self.tpot_ms}")


@dataclass(frozen=True)
class CachePolicyConfig:
    """KV-cache policy knobs: how KV is stored (quantization) and what is dropped (eviction).

    Mirrors the CachePolicy resource's `quantization` and `eviction` blocks
    (`from_spec` converts one); `kvfleet.dataplane.kvcache.policy.PolicySpec.from_config`
    turns it into codecs and an eviction policy. key/value_quantization are the
    stored dtypes (the resource sets both from `quantization.dtype`).
    """

    key_quantization: str = "none"
    value_quantization: str = "none"
    key_granularity: str | None = None  # None = per-channel (int) / per-head (fp8)
    value_granularity: str | None = None  # None = per-token (int) / per-head (fp8)
    group_size: int = 32
    residual_tokens: int = 0
    quant_sink_tokens: int = 0
    keys_pre_rope: bool = False
    rotate_keys: bool = False  # keys quantized after a fixed Hadamard rotation (kvcache/quant.py)
    eviction: str = "none"
    eviction_budget_tokens: int | None = None
    eviction_budget_ratio: float | None = None
    eviction_window_tokens: int = 32
    eviction_sink_tokens: int = 4
    observation_window: int = 32
    pooling_kernel: int = 7
    pyramid: bool = False
    lookahead_dir: str | None = None  # eviction lookahead: the trained module (`kvfleet train-lookahead`)

    def __post_init__(self) -> None:
        for name in ("key_quantization", "value_quantization"):
            val = getattr(self, name)
            _check(val in QUANTIZATION_MODES, f"cache_policy.{name}: {val!r} not in {QUANTIZATION_MODES}")
        for name in ("key_granularity", "value_granularity"):
            val = getattr(self, name)
            _check(val is None or val in GRANULARITIES, f"cache_policy.{name}: {val!r} not in {GRANULARITIES}")
        _check(self.group_size >= 1, "cache_policy.group_size must be >= 1")
        _check(self.residual_tokens >= 0 and self.quant_sink_tokens >= 0,
               "cache_policy.residual_tokens and quant_sink_tokens must be >= 0")
        _check(self.eviction in EVICTION_MODES, f"cache_policy.eviction: {self.eviction!r} not in {EVICTION_MODES}")
        _check(
            self.eviction_budget_tokens is None or self.eviction_budget_tokens > 0,
            "cache_policy.eviction_budget_tokens must be > 0",
        )
        _check(self.eviction_budget_ratio is None or 0.0 < self.eviction_budget_ratio <= 1.0,
               "cache_policy.eviction_budget_ratio must be in (0, 1]")
        if self.eviction != "none":
            _check((self.eviction_budget_tokens is None) != (self.eviction_budget_ratio is None),
                   f"cache_policy: eviction {self.eviction!r} needs exactly one of eviction_budget_tokens "
                   "or eviction_budget_ratio")
            _check(self.eviction_budget_tokens is None
                   or self.eviction_budget_tokens > self.eviction_sink_tokens + self.eviction_window_tokens,
                   "cache_policy.eviction_budget_tokens must exceed eviction_sink_tokens + eviction_window_tokens")
        _check(self.pooling_kernel >= 1 and self.pooling_kernel % 2 == 1, "cache_policy.pooling_kernel must be odd")
        _check(not self.rotate_keys or self.key_quantization in INT_QUANTIZATION,
               f"cache_policy.rotate_keys needs integer keys ({', '.join(INT_QUANTIZATION)}), "
               f"not {self.key_quantization!r}")
        _check((self.eviction == "lookahead") == bool(self.lookahead_dir),
               "cache_policy.lookahead_dir: set it exactly when eviction is 'lookahead' (the trained module)")

    def token_grouped(self, kind: str) -> bool:
        """Whether keys/values (`kind` "key"/"value") get scales shared by a group of tokens.

        The defaults (granularity unset): int keys per-channel and fp8 per-head (grouped), int values
        per-token; with an eviction policy everything unset is per-token.
        """
        dtype = self.key_quantization if kind == "key" else self.value_quantization
        gran = self.key_granularity if kind == "key" else self.value_granularity
        if dtype in ("none", "fp16", "bf16"):
            return False
        if gran is None:
            gran = "per-token" if self.eviction != "none" else \
                ("per-head" if dtype == "fp8" else ("per-channel" if kind == "key" else "per-token"))
        return gran != "per-token"

    def check_servable(self, disaggregated: bool = False) -> None:
        """Raise ConfigError, naming the field, for a policy the paged serving engine cannot apply.

        Torch-free, so the operator refuses such a fleet (Degraded, InvalidConfig) instead of
        rendering pods that would crash at startup. The paged engine applies streaming-llm, h2o,
        snapkv and keydiff with ONE kept-token set per sequence (scores summed over layers and kv
        heads), and lookahead (prompt compression) with one set per layer and kv head of equal size
        (whole token groups when scales are shared by a group of tokens);
        `pyramid` needs per-layer block tables and is rejected (`kvfleet eval-cache` evaluates it).
        disaggregated: prefill hands KV to decode; a sequence's eviction state (kept positions,
        scores) does not travel with it, so eviction is refused there.
        """
        if self.eviction == "none":
            return
        _check(not disaggregated, f"cache_policy.eviction: {self.eviction!r}: a disaggregated fleet moves KV from "
               "prefill to decode without the eviction state; use eviction 'none' or the colocated topology")
        _check(self.eviction in SERVING_EVICTION_POLICIES,
               f"cache_policy.eviction: {self.eviction!r}: the paged engine supports "
               f"{', '.join(SERVING_EVICTION_POLICIES)}")
        _check(self.eviction != "lookahead" or not self.keys_pre_rope,
               "cache_policy.keys_pre_rope: eviction 'lookahead' keeps different tokens per layer and kv head, "
               "and a pre-RoPE key would need a position per head and slot; use post-RoPE keys")
        _check(not self.pyramid, "cache_policy.pyramid: per-layer budgets need per-layer block tables; the paged "
               "engine keeps one token set per sequence (PolicyAttention evaluates pyramid budgets)")
        for kind in ("key", "value"):
            _check(not self.token_grouped(kind) or self.eviction == "lookahead",
                   f"cache_policy.{kind}_granularity: scales shared by a group of tokens cannot follow tokens that "
                   f"eviction {self.eviction!r} compacts; use per-token (the default when an eviction policy is "
                   "set), or eviction 'lookahead', which keeps whole groups")
            gran = self.key_granularity if kind == "key" else self.value_granularity
            _check(gran != "per-tensor", f"cache_policy.{kind}_granularity: per-tensor scales cannot move with "
                   "one kv head's rows; eviction keeps rows per kv head")
        _check(self.quant_sink_tokens <= self.eviction_sink_tokens,
               f"cache_policy.quant_sink_tokens {self.quant_sink_tokens} must not exceed eviction_sink_tokens "
               f"{self.eviction_sink_tokens}: full-precision sinks are never evicted")
        _check(self.residual_tokens <= self.eviction_window_tokens,
               f"cache_policy.residual_tokens {self.residual_tokens} must not exceed eviction_window_tokens "
               f"{self.eviction_window_tokens}: the full-precision tail is never evicted")

    def check_block_size(self, block_size: int) -> None:
        """Token-grouped scales cover whole sub-blocks or whole runs of blocks: the sizes must divide."""
        if self.token_grouped("key") or self.token_grouped("value"):
            g = self.group_size
            _check(block_size % g == 0 or g % block_size == 0,
                   f"cache_policy.group_size {g} and block_size {block_size} must divide one another "
                   "(token-grouped scales)")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CachePolicyConfig:
        """From a CachePolicy resource's `spec` (camelCase, as the CRD stores it)."""
        q = dict(spec.get("quantization") or {})
        e = dict(spec.get("eviction") or {})
        dtype = q.get("dtype", "none")
        return cls(
            key_quantization=dtype, value_quantization=dtype,
            key_granularity=q.get("keyGranularity"), value_granularity=q.get("valueGranularity"),
            group_size=q.get("groupSize", 32), residual_tokens=q.get("residualTokens", 0),
            quant_sink_tokens=q.get("sinkTokens", 0), keys_pre_rope=q.get("keysPreRope", False),
            rotate_keys=q.get("rotateKeys", False),
            eviction=e.get("policy", "none"), eviction_budget_tokens=e.get("budgetTokens"),
            eviction_budget_ratio=e.get("budgetRatio"), eviction_window_tokens=e.get("windowTokens", 32),
            eviction_sink_tokens=e.get("sinkTokens", 4), observation_window=e.get("observationWindow", 32),
            pooling_kernel=e.get("poolingKernel", 7), pyramid=e.get("pyramid", False),
            lookahead_dir=e.get("lookaheadDir"),
        )


@dataclass(frozen=True)
class AdapterConfig:
    """One LoRA adapter served on the engine's base weights (a LoRA ModelVariant).

    name: the ModelVariant name (what `GenerationRequest.variant` carries); served_name: the OpenAI
    `model` clients send (default: name). dir: a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors); rank/alpha, when given, must agree with its adapter_config.json (the
    engine checks at startup; None: as the adapter declares). preload: load at startup, not on first use.
    """

    name: str
    dir: str
    rank: int | None = None
    alpha: float | None = None
    served_name: str = ""
    preload: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name), "adapters[].name must be non-empty")
        _check(bool(self.dir), f"adapter {self.name!r}: dir must be non-empty")
        _check(self.rank is None or self.rank >= 1, f"adapter {self.name!r}: rank must be >= 1, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, f"adapter {self.name!r}: alpha must be > 0, got {self.alpha}")

    @property
    def model_name(self) -> str:
        """The OpenAI `model` name of this adapter."""
        return self.served_name or self.name


@dataclass(frozen=True)
class KVShareConfig:
    """Variant `variant` reuses the prefix KV that `from_variant` computed in this engine, except in
    `recompute_layers` (DroidSpeak; `engine/kv_sharing.py`). num_layers / from_weights / to_weights,
    when set (from a profile), must match what the engine loads, or it refuses to start."""

    variant: str
    from_variant: str
    recompute_layers: tuple[int, ...]
    source: str = "manual"  # "manual", or "profile <ConfigMap>" for status and logs
    num_layers: int | None = None
    from_weights: str | None = None
    to_weights: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.variant) and bool(self.from_variant), "kv_sharing[]: variant and from_variant are required")
        _check(self.variant != self.from_variant, f"kv_sharing {self.variant!r}: from_variant must be another variant")
        layers = list(self.recompute_layers)
        object.__setattr__(self, "recompute_layers", tuple(layers))  # JSON gives a list
        _check(all(isinstance(x, int) and x >= 0 for x in layers) and layers == sorted(set(layers)),
               f"kv_sharing {self.variant!r}: recompute_layers must be distinct non-negative layers in order")


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine process needs to serve one model variant.

    KV memory is given either as `num_kv_blocks` or as `kv_cache_bytes` (not
    both); with neither, the engine sizes the cache to hold `max_num_seqs`
    sequences of `max_model_len` tokens.
    """

    model_dir: str
    variant: str = ""
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu
    device: str = "auto"  # auto = cuda if available else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunking)
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    enable_prefix_caching: bool = True
    slo_classes: tuple[SLOClassConfig, ...] = ()
    default_slo_class: str | None = None
    starvation_ms: float = 10_000.0  # waiting longer than this jumps the slack order
    cache_policy: CachePolicyConfig = field(default_factory=CachePolicyConfig)
    # a full fine-tune: its weights (HF dir) replace model_dir's; the tokenizer is the fine-tune's when it
    # has one, else model_dir's
    fine_tune_dir: str | None = None
    # LoRA variants served on model_dir's weights, in one batch with the base (engine/adapters.py)
    adapters: tuple[AdapterConfig, ...] = ()
    # resident adapters' weights at most (LRU beyond it). NOTE: the running adapters are also stacked into one
    # padded copy per step set (AdapterManager.stack_bytes), up to max_active_adapters x the largest, on top
    adapter_memory_bytes: int = 256 << 20
    max_active_adapters: int = 8  # distinct adapters among running sequences at most (the scheduler's cap)
    cpu_packed_linear: bool = True  # CPU only: linear weights prepacked for oneDNN (model/packed_linear.py)
    # CPU only: compiled kernels (dataplane/kernels): auto = use them when they build, else the torch path
    # (logged); on = fail at start if they cannot be built; off = the torch path
    cpu_kernels: str = "auto"
    # DroidSpeak: variants served here that reuse a sibling's prefix KV (prefixCache.scope family)
    kv_sharing: tuple[KVShareConfig, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.model_dir), "model_dir must be non-empty")
        _check(self.fine_tune_dir is None or bool(self.fine_tune_dir), "fine_tune_dir must be non-empty or null")
        _check(not (self.fine_tune_dir and self.adapters),
               "adapters apply to the base weights: a full fine-tune (fine_tune_dir) serves no adapters")
        anames = [a.name for a in self.adapters]
        served = [a.model_name for a in self.adapters]
        _check(len(anames) == len(set(anames)), f"adapters: duplicate names in {anames}")
        _check(len(served) == len(set(served)), f"adapters: duplicate served names in {served}")
        _check(not self.variant or self.variant not in anames,
               f"adapters: {self.variant!r} is the base variant's name")
        _check(self.adapter_memory_bytes > 0, "adapter_memory_bytes must be > 0")
        _check(self.max_active_adapters >= 1, "max_active_adapters must be >= 1")
        _check(self.dtype in DTYPES, f"dtype: {self.dtype!r} not in {DTYPES}")
        _check(self.cpu_kernels in CPU_KERNEL_MODES, f"cpu_kernels: {self.cpu_kernels!r} not in {CPU_KERNEL_MODES}")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"device: {self.device!r} must be auto, cpu or cuda[:N]",
        )
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two, got {self.block_size}")
        self.cache_policy.check_block_size(self.block_size)
        _check(not (self.num_kv_blocks is not None and self.kv_cache_bytes is not None),
               "give num_kv_blocks or kv_cache_bytes, not both")
        _check(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks must be > 0")
        _check(self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "kv_cache_bytes must be > 0")
        _check(self.max_num_seqs > 0, "max_num_seqs must be > 0")
        _check(self.max_num_batched_tokens > 0, "max_num_batched_tokens must be > 0")
        _check(self.max_model_len is None or self.max_model_len > 0, "max_model_len must be > 0")
        _check(self.starvation_ms > 0, "starvation_ms must be > 0")
        self._check_kv_sharing(anames)
        names = [c.name for c in self.slo_classes]
        _check(len(names) == len(set(names)), f"slo_classes: duplicate names in {names}")
        _check(self.default_slo_class is None or self.default_slo_class in names,
               f"default_slo_class {self.default_slo_class!r} is not one of slo_classes {names}")

    def _check_kv_sharing(self, adapter_names: list[str]) -> None:
        if not self.kv_sharing:
            return
        served = [self.variant, *adapter_names]
        receivers = [s.variant for s in self.kv_sharing]
        _check(len(receivers) == len(set(receivers)), f"kv_sharing: a variant listed twice in {receivers}")
        for s in self.kv_sharing:
            _check(s.variant in served and s.from_variant in served,
                   f"kv_sharing {s.variant!r} <- {s.from_variant!r}: both must be served by this engine {served}")
        cp = self.cache_policy
        _check(self.enable_prefix_caching, "kv_sharing needs the prefix cache")
        _check(cp.key_quantization == cp.value_quantization == "none" and cp.eviction == "none",
               "kv_sharing needs unquantized, unevicted KV: quantized blocks keep per-sequence rows that "
               "another variant cannot recompute into (not implemented)")

    @property
    def weights_dir(self) -> str:
        """The directory whose weights the engine loads: the full fine-tune's, else the base's."""
        return self.fine_tune_dir or self.model_dir

    def adapter(self, variant: str) -> AdapterConfig | None:
        """The adapter serving ModelVariant `variant` (None: the base, or unknown)."""
        return next((a for a in self.adapters if a.name == variant), None)

    def sharing(self, variant: str) -> KVShareConfig | None:
        """How `variant` reuses a sibling's KV here (None: it does not)."""
        return next((s for s in self.kv_sharing if s.variant == variant), None)

    def slo_class(self, name: str | None) -> SLOClassConfig | None:
        """The named class if known, else the default class, else None (best effort)."""
        by_name = {c.name: c for c in self.slo_classes}
        if name is not None and name in by_name:
            return by_name[name]
        return by_name.get(self.default_slo_class) if self.default_slo_class else None

    # -- serialization ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Stable JSON (sorted keys) for a ConfigMap."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Validating inverse of `to_dict`; unknown keys are an error."""
        _check(isinstance(data, dict), f"engine config must be an object, got {type(data).__name__}")
        data = dict(data)
        _reject_unknown(cls, data, "engine config")
        for key, item_cls in (("slo_classes", SLOClassConfig), ("adapters", AdapterConfig),
                              ("kv_sharing", KVShareConfig)):
            if key in data:
                raw = data[key]
                _check(isinstance(raw, list | tuple), f"{key} must be a list")
                data[key] = tuple(_build_object(item_cls, c, f"{key}[{i}]") for i, c in enumerate(raw))
        if "cache_policy" in data:
            data["cache_policy"] = _build_object(CachePolicyConfig, data["cache_policy"], "cache_policy")
        return _build(cls, data, "engine config")

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        """Parse and validate JSON produced by `to_json` (or written by hand)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"engine config is not valid JSON: {e}") from e
        return cls.from_dict(data)


def tokenizer_dir(cfg: EngineConfig) -> str:
    """Where the tokenizer is: the full fine-tune's directory when it has a tokenizer.json, else the base's."""
    from pathlib import Path

    if cfg.fine_tune_dir and (Path(cfg.fine_tune_dir) / "tokenizer.json").is_file():
        return cfg.fine_tune_dir
    return cfg.model_dir


_SCALARS = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _reject_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")


def _build_object(cls: type, data: Any, where: str) -> Any:
    """A nested config object from its JSON object: unknown keys refused, scalars type-checked."""
    _check(isinstance(data, dict), f"{where} must be an object")
    _reject_unknown(cls, data, where)
    return _build(cls, data, where)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Type-check scalar fields (JSON has no tuples/dataclasses) then construct."""
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        val = data[f.name]
        ftype = str(f.type)
        base = ftype.split(" | ")[0]
        if val is None:
            _check("None" in ftype, f"{where}.{f.name} must not be null")
            continue
        if base in _SCALARS:
            ok = isinstance(val, _SCALARS[base]) and not (base != "bool" and isinstance(val, bool))
            _check(ok, f"{where}.{f.name} must be {base}, got {type(val).__name__} {val!r}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
