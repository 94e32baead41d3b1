"""Cross-variant KV sharing (DroidSpeak): the profile a pair of variants is measured into. Torch-free.

Variant B (`to`) reuses the prefix KV that its sibling A (`from`, a fine-tune of the same base)
computed, except in a few *recomputed* layers: for each contiguous group [i..j] of them, B runs its
own layers i..j over the prefix tokens starting from A's hidden state entering layer i (the
"E-cache", stored only at such transition layers; a group starting at layer 0 starts from the
token embeddings, which cost nothing to store). `kvfleet profile-sharing` measures which layers
matter and writes a `SharingProfile` (JSON); the operator reads it from a ConfigMap, checks it
names the pair it is applied to, and renders the chosen layers into the engine config.

    profile = SharingProfile.from_json(text)
    profile.check_pair("bible-lora", "python-lora", "smollm2-135m")   # ProfileMismatch if not
    plan = profile.plan(max_fraction=0.25)     # the layers to recompute (None: no plan keeps the budget)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PROFILE_KIND = "KVSharingProfile"
PROFILE_VERSION = 1
DEFAULT_MAX_FRACTION = 0.25  # ModelVariant kvSharing.maxRecomputeFraction when unset


class ProfileMismatch(ValueError):
    """A profile does not belong to the variants (or model) it is applied to; the message says why."""


def layer_groups(layers: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted layer indices -> contiguous groups [(first, last)] (inclusive)."""
    groups: list[tuple[int, int]] = []
    for layer in sorted(set(layers)):
        if groups and groups[-1][1] == layer - 1:
            groups[-1] = (groups[-1][0], layer)
        else:
            groups.append((layer, layer))
    return groups


def transition_layers(layers: Iterable[int]) -> list[int]:
    """Layers whose incoming hidden state the sender must store: the first of each group, except 0."""
    return [first for first, _ in layer_groups(layers) if first > 0]


@dataclass(frozen=True)
class ProfilePoint:
    """One point of the quality curve: recompute `layers`, measured against B's own full prefill."""

    layers: tuple[int, ...]
    ppl_increase: float  # relative: exp(mean NLL shared - mean NLL own) - 1
    token_agreement: float  # share of scored positions where greedy tokens agree with B's own
    # mean KL(B own || shared) per scored position, nats (None: not measured). NOTE: unlike ppl_increase it
    # cannot turn negative when A's KV happens to predict the calibration text better than B's own.
    kl_divergence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"layers": list(self.layers), "pplIncrease": self.ppl_increase, "tokenAgreement": self.token_agreement}
        return out if self.kl_divergence is None else out | {"klDivergence": self.kl_divergence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfilePoint:
        kl = data.get("klDivergence")
        return cls(tuple(int(x) for x in data["layers"]), float(data["pplIncrease"]),
                   float(data["tokenAgreement"]), None if kl is None else float(kl))


@dataclass(frozen=True)
class SharingProfile:
    """What `kvfleet profile-sharing` measured for one ordered pair (from -> to) of one family."""

    from_variant: str
    to_variant: str
    family: str
    num_layers: int
    from_weights: str = ""  # weights identities (the prefix key's) the profile was measured on; "" = base
    to_weights: str = ""
    calibration_sha256: str = ""
    calibration_tokens: int = 0
    quality_budget: float = 0.01  # the largest relative perplexity rise a recommended plan may cost
    layer_scores: tuple[float, ...] = ()  # per layer: how much reusing A's KV there hurts B (higher = worse)
    curve: tuple[ProfilePoint, ...] = ()  # plans with more and more recomputed layers
    extra: Mapping[str, Any] = field(default_factory=dict)  # provenance (paths, settings, versions)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.layer_scores and len(self.layer_scores) != self.num_layers:
            raise ValueError(f"layer_scores has {len(self.layer_scores)} entries for {self.num_layers} layers")
        for point in self.curve:
            if any(not 0 <= x < self.num_layers for x in point.layers):
                raise ValueError(f"curve layers {list(point.layers)} outside [0, {self.num_layers})")

    def ranking(self) -> list[int]:
        """Layers, most harmful to reuse first (ties by index: deterministic)."""
        return sorted(range(self.num_layers), key=lambda i: (-self.layer_scores[i], i)) \
            if self.layer_scores else []

    def meets_budget(self, point: ProfilePoint) -> bool:
        """Perplexity moved by at most the budget, either way: a *fall* also means B no longer computes what
        it would on its own (A's KV can happen to fit the calibration text better than B's)."""
        return abs(point.ppl_increase) <= self.quality_budget

    def within(self, max_fraction: float) -> list[ProfilePoint]:
        """The curve's points recomputing at most `max_fraction` of the layers."""
        return [p for p in self.curve if len(p.layers) <= max_fraction * self.num_layers]

    def plan(self, max_fraction: float = DEFAULT_MAX_FRACTION) -> ProfilePoint | None:
        """The fewest recomputed layers, within `max_fraction` of the layers, that meet the quality budget;
        None when no such point was measured (then sharing must stay off for this pair)."""
        meeting = [p for p in self.within(max_fraction) if self.meets_budget(p)]
        return min(meeting, key=lambda p: (len(p.layers), abs(p.ppl_increase))) if meeting else None

    def closest(self, max_fraction: float = DEFAULT_MAX_FRACTION) -> ProfilePoint | None:
        """Within `max_fraction`, the point whose perplexity moved least (to report when `plan` is None)."""
        pts = self.within(max_fraction)
        return min(pts, key=lambda p: (abs(p.ppl_increase), len(p.layers))) if pts else None

    def check_pair(self, from_variant: str, to_variant: str, family: str) -> None:
        """Raise ProfileMismatch unless this profile was measured for from_variant -> to_variant."""
        if (self.from_variant, self.to_variant) != (from_variant, to_variant):
            raise ProfileMismatch(f"the profile measures {self.from_variant} -> {self.to_variant}, "
                                  f"not {from_variant} -> {to_variant}")
        if self.family != family:
            raise ProfileMismatch(f"the profile is for family {self.family!r}, not {family!r}")

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": PROFILE_KIND, "version": PROFILE_VERSION,
                "from": {"variant": self.from_variant, "weights": self.from_weights},
                "to": {"variant": self.to_variant, "weights": self.to_weights},
                "family": self.family, "numLayers": self.num_layers,
                "calibration": {"sha256": self.calibration_sha256, "tokens": self.calibration_tokens},
                "qualityBudget": self.quality_budget, "layerScores": list(self.layer_scores),
                "ranking": self.ranking(), "curve": [p.to_dict() for p in self.curve],
                "extra": dict(self.extra)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SharingProfile:
        """Parse (and validate) a profile; ProfileMismatch with the reason when it is not one."""
        try:
            if data.get("kind") != PROFILE_KIND or data.get("version") != PROFILE_VERSION:
                raise ProfileMismatch(f"not a {PROFILE_KIND} v{PROFILE_VERSION} (kind {data.get('kind')!r}, "
                                      f"version {data.get('version')!r})")
            cal = data.get("calibration") or {}
            return cls(
                from_variant=str(data["from"]["variant"]), to_variant=str(data["to"]["variant"]),
                family=str(data["family"]), num_layers=int(data["numLayers"]),
                from_weights=str(data["from"].get("weights", "")), to_weights=str(data["to"].get("weights", "")),
                calibration_sha256=str(cal.get("sha256", "")), calibration_tokens=int(cal.get("tokens", 0)),
                quality_budget=float(data.get("qualityBudget", 0.01)),
                layer_scores=tuple(float(x) for x in data.get("layerScores", ())),
                curve=tuple(ProfilePoint.from_dict(p) for p in data.get("curve", ())),
                extra=dict(data.get("extra") or {}))
        except ProfileMismatch:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProfileMismatch(f"malformed {PROFILE_KIND}: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> SharingProfile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileMismatch(f"a {PROFILE_KIND} must be JSON: {e}") from e
        if not isinstance(data, dict):
            raise ProfileMismatch(f"a {PROFILE_KIND} is a JSON object")
        return cls.from_dict(data)
