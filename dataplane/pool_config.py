"""The memory pool's configuration (mempool.json): torch-free, read by the pool role and by the operator
to check what it renders with the pool's own rules.

    cfg = PoolConfig.from_json(text)   # camelCase keys; unknown keys are refused, not ignored
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

MAX_PINNED_FRACTION = 0.5  # of a replica's high mark: what every class's pins together may hold


def check_pool_numbers(capacity_bytes: int, high_watermark: float, pin_caps: Mapping[str, int]) -> int:
    """Raise ValueError for numbers a pool cannot run with; returns the bytes all pins together may hold."""
    if capacity_bytes <= 0:
        raise ValueError("capacity_bytes must be > 0")
    if not 0.0 < high_watermark <= 1.0:
        raise ValueError("high_watermark must be in (0, 1]")
    if any(cap < 0 for cap in pin_caps.values()):
        raise ValueError("a class's pinned bytes cap must be >= 0")
    max_pinned = int(int(capacity_bytes * high_watermark) * MAX_PINNED_FRACTION)
    if sum(pin_caps.values()) > max_pinned:
        raise ValueError(f"the SLO classes' kvPinning.maxPinnedBytes ({dict(pin_caps)}) sum to more than the "
                         f"{max_pinned} bytes one pool replica pins ({MAX_PINNED_FRACTION:g} x "
                         f"capacity per replica x highWatermark): lower them or grow the pool")
    return max_pinned


@dataclass(frozen=True)
class PoolConfig:
    """mempool.json as the operator renders it (camelCase keys; unknown keys are refused, not ignored)."""

    capacity_bytes: int
    high_watermark: float = 0.9
    port: int = 50052
    fleet: str = ""
    replicas: int = 1
    block_size_tokens: int = 0
    kv_dtype: str = ""
    pinning: Mapping[str, int] = field(default_factory=dict)  # SLO class -> max pinned bytes per replica
    max_block_bytes: int = 16 << 20

    KEYS: ClassVar[dict[str, str]] = {
        "capacityBytesPerReplica": "capacity_bytes", "highWatermark": "high_watermark", "port": "port",
        "fleet": "fleet", "replicas": "replicas", "blockSizeTokens": "block_size_tokens", "kvDtype": "kv_dtype",
        "pinning": "pinning", "maxBlockBytes": "max_block_bytes"}

    def __post_init__(self) -> None:
        check_pool_numbers(int(self.capacity_bytes), float(self.high_watermark),
                           {str(k): int(v) for k, v in self.pinning.items()})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolConfig:
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"mempool.json: unknown keys {unknown} (this pool reads {sorted(cls.KEYS)})")
        if "capacityBytesPerReplica" not in data:
            raise ValueError("mempool.json: capacityBytesPerReplica is required")
        return cls(**{cls.KEYS[k]: v for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str) -> PoolConfig:
        return cls.from_dict(json.loads(text))
