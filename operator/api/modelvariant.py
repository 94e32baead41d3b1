"""ModelVariant: one servable model — base weights, an optional fine-tune, its family."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .common import NAME_RULE, KubeModel, Name, ReferencedStatus, Resource, Rule
from .shapes import DNS_SUBDOMAIN, HOST_PATH, NO_DOT_SEGMENTS, NOT_SYSTEM_DIR, SERVED_MODEL_NAME, SUB_PATH

# A node directory: absolute, normalised (no '.', '..', empty segments or trailing '/'), printable
# without whitespace or `$(`, never a system directory. The operator mounts it only below the prefixes
# it is configured with (--allow-host-path-prefix); by default it refuses every hostPath.
HostPath = Annotated[str, Field(max_length=4096, pattern=HOST_PATH), NO_DOT_SEGMENTS, NOT_SYSTEM_DIR]
# A directory inside a volume: relative, normalised, same characters as HostPath.
SubPath = Annotated[str, Field(max_length=4096, pattern=SUB_PATH), NO_DOT_SEGMENTS]


class WeightsSource(KubeModel):
    """Where an HF-format model directory (config.json + *.safetensors + tokenizer.json) comes from.

    Exactly one of `builtin`, `hostPath` or `pvc` is set.
    """

    builtin: Literal["smollm2-135m-instruct", "tiny-llama"] | None = Field(
        default=None,
        description="A model the kvfleet image can materialise itself: the real SmolLM2-135M-Instruct "
        "(imported from GGUF) or a deterministic tiny random Llama for tests.",
    )
    host_path: HostPath | None = Field(
        default=None,
        description="Absolute directory on the node (no '.'/'..' segments, no system directories). The "
        "operator mounts it only below a prefix it allows (--allow-host-path-prefix; none by default).",
    )
    pvc: PvcSource | None = Field(default=None, description="A PersistentVolumeClaim holding the directory.")

    __rules__ = (
        Rule(
            cel="[has(self.builtin), has(self.hostPath), has(self.pvc)].filter(x, x).size() == 1",
            message="exactly one of builtin, hostPath or pvc must be set",
            check=lambda s: sum(x is not None for x in (s.builtin, s.host_path, s.pvc)) == 1,
        ),
    )


class PvcSource(KubeModel):
    """A directory inside a PersistentVolumeClaim in the variant's namespace."""

    claim_name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Name of the PersistentVolumeClaim (a DNS subdomain).",
    )
    sub_path: SubPath = Field(
        default="",
        description="Directory inside the volume, relative ('' = its root; no leading '/', no '.'/'..' segments).",
    )


class FineTune(KubeModel):
    """A fine-tune applied on top of the base weights."""

    type: Literal["full", "lora"] = Field(
        description="full: complete replacement weights; lora: a LoRA adapter."
    )
    weights: WeightsSource = Field(description="Where the fine-tuned weights or the adapter live.")
    lora_rank: int | None = Field(default=None, ge=1, le=1024, description="LoRA rank r (lora only).")
    lora_alpha: float | None = Field(
        default=None, gt=0, le=65536, description="LoRA scaling alpha (lora only)."
    )

    __rules__ = (
        Rule(
            cel="self.type == 'lora' || (!has(self.loraRank) && !has(self.loraAlpha))",
            message="loraRank and loraAlpha apply only to type lora",
            check=lambda s: s.type == "lora" or (s.lora_rank is None and s.lora_alpha is None),
            field_path=".type",
        ),
    )


class SharingProfileRef(KubeModel):
    """Where a `kvfleet profile-sharing` profile (JSON) of this variant's pair is: a ConfigMap key."""

    config_map: Name = Field(description="A ConfigMap in the variant's namespace.")
    key: str = Field(default="profile.json", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="The key holding the profile.")


class KVSharing(KubeModel):
    """Cross-variant KV reuse (DroidSpeak): reuse a sibling's prefix KV, recompute a few critical layers."""

    mode: Literal["none", "manual", "auto"] = Field(
        default="none",
        description="none: never reuse a sibling's KV; manual: recompute exactly recomputeLayers; "
        "auto: recompute the layers an offline profile of this pair selects.",
    )
    from_variant: Name | None = Field(
        default=None, description="The sibling ModelVariant (same family, same namespace) whose KV is reused."
    )
    recompute_layers: list[Annotated[int, Field(le=1023)]] = Field(
        default_factory=list,
        max_length=256,
        description="Layer indices (0-based) recomputed on reuse (manual mode); contiguous groups work best.",
    )
    max_recompute_fraction: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Auto mode only: at most this fraction of layers is recomputed (0.25 when unset).",
    )
    profile: SharingProfileRef | None = Field(
        default=None,
        description="Auto mode only: the profile of this pair (fromVariant -> this variant); the operator "
        "recomputes the fewest layers that keep the profile's quality budget, within maxRecomputeFraction.",
    )

    __rules__ = (
        Rule(
            cel="self.mode == 'none' || has(self.fromVariant)",
            message="fromVariant is required when mode is manual or auto",
            check=lambda s: s.mode == "none" or s.from_variant is not None,
            field_path=".mode",
        ),
        Rule(
            cel="self.mode != 'manual' || size(self.recomputeLayers) > 0",
            message="recomputeLayers must list at least one layer in manual mode",
            check=lambda s: s.mode != "manual" or len(s.recompute_layers) > 0,
            field_path=".recomputeLayers",
        ),
        Rule(
            cel="self.recomputeLayers.all(l, l >= 0)",
            message="recomputeLayers must be non-negative layer indices",
            check=lambda s: all(x >= 0 for x in s.recompute_layers),
            field_path=".recomputeLayers",
        ),
        # Nothing declared is silently ignored: details of another mode are refused.
        Rule(
            cel="self.mode != 'none' || !has(self.fromVariant)",
            message="fromVariant is ignored when mode is none: set mode manual or auto, or remove it",
            check=lambda s: s.mode != "none" or s.from_variant is None,
            field_path=".fromVariant",
        ),
        Rule(
            cel="self.mode == 'manual' || size(self.recomputeLayers) == 0",
            message="recomputeLayers applies only to mode manual",
            check=lambda s: s.mode == "manual" or not s.recompute_layers,
            field_path=".recomputeLayers",
        ),
        Rule(
            cel="self.mode != 'auto' || has(self.profile)",
            message="mode auto needs profile (a ConfigMap written from `kvfleet profile-sharing`)",
            check=lambda s: s.mode != "auto" or s.profile is not None,
            field_path=".profile",
        ),
        Rule(
            cel="self.mode == 'auto' || !has(self.profile)",
            message="profile applies only to mode auto",
            check=lambda s: s.mode == "auto" or s.profile is None,
            field_path=".profile",
        ),
        Rule(
            cel="self.mode == 'auto' || !has(self.maxRecomputeFraction)",
            message="maxRecomputeFraction applies only to mode auto",
            check=lambda s: s.mode == "auto" or s.max_recompute_fraction is None,
            field_path=".maxRecomputeFraction",
        ),
    )


class ModelVariantSpec(KubeModel):
    """What a ModelVariant serves."""

    family: Name = Field(
        description="Model family (e.g. smollm2-135m). Variants of one family have the same architecture "
        "and may share KV through the memory pool."
    )
    base: WeightsSource = Field(description="The base model weights.")
    fine_tune: FineTune | None = Field(default=None, description="An optional fine-tune on top of the base.")
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        pattern=SERVED_MODEL_NAME,
        description="The OpenAI `model` name clients use (letters, digits and ._:/@+-; no spaces, quotes or "
        "markup); defaults to metadata.name.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="Weight and activation dtype in the engine."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=1048576,
        description="Longest prompt + completion in tokens; defaults to the model's.",
    )
    kv_sharing: KVSharing = Field(
        default_factory=KVSharing, description="Whether and how this variant reuses a sibling's KV cache."
    )


class ModelVariant(Resource):
    """The whole ModelVariant object."""

    kind: Literal["ModelVariant"] = "ModelVariant"
    spec: ModelVariantSpec = Field(description="Desired state.")
    status: ReferencedStatus | None = Field(
        default=None, description="Observed state, written by the operator."
    )

    __rules__ = (
        Rule(
            cel="!has(self.spec.kvSharing.fromVariant) || self.spec.kvSharing.fromVariant != self.metadata.name",
            message="spec.kvSharing.fromVariant must name a sibling, not the variant itself",
            check=lambda s: s.spec.kv_sharing.from_variant != s.metadata.name,
            field_path=".spec.kvSharing.fromVariant",
        ),
        NAME_RULE,
    )


WeightsSource.model_rebuild()
