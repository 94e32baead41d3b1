"""ModelVariant: one servable model — base weights, an optional fine-tune, its family."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import KubeModel, Name, ReferencedStatus, Resource, Rule


class WeightsSource(KubeModel):
    """Where an HF-format model directory (config.json + *.safetensors + tokenizer.json) comes from.

    Exactly one of `builtin`, `hostPath` or `pvc` is set.
    """

    builtin: Literal["smollm2-135m-instruct", "tiny-llama"] | None = Field(
        default=None,
        description="A model the kvfleet image can materialise itself: the real SmolLM2-135M-Instruct "
        "(imported from GGUF) or a deterministic tiny random Llama for tests.",
    )
    host_path: str | None = Field(
        default=None, max_length=4096, pattern=r"^/", description="Absolute directory path on the node."
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

    claim_name: Name = Field(description="Name of the PersistentVolumeClaim.")
    sub_path: str = Field(
        default="", max_length=4096, description="Directory inside the volume ('' = its root)."
    )


class FineTune(KubeModel):
    """A fine-tune applied on top of the base weights."""

    type: Literal["full", "lora"] = Field(
        description="full: complete replacement weights; lora: a LoRA adapter."
    )
    weights: WeightsSource = Field(description="Where the fine-tuned weights or the adapter live.")
    lora_rank: int | None = Field(default=None, ge=1, le=1024, description="LoRA rank r (lora only).")
    lora_alpha: float | None = Field(default=None, gt=0, description="LoRA scaling alpha (lora only).")

    __rules__ = (
        Rule(
            cel="self.type == 'lora' || (!has(self.loraRank) && !has(self.loraAlpha))",
            message="loraRank and loraAlpha apply only to type lora",
            check=lambda s: s.type == "lora" or (s.lora_rank is None and s.lora_alpha is None),
        ),
    )


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
    recompute_layers: list[int] = Field(
        default_factory=list,
        max_length=256,
        description="Layer indices (0-based) recomputed on reuse (manual mode); contiguous groups work best.",
    )
    max_recompute_fraction: float = Field(
        default=0.25, gt=0, le=1, description="Auto mode: at most this fraction of layers is recomputed."
    )

    __rules__ = (
        Rule(
            cel="self.mode == 'none' || has(self.fromVariant)",
            message="fromVariant is required when mode is manual or auto",
            check=lambda s: s.mode == "none" or s.from_variant is not None,
        ),
        Rule(
            cel="self.mode != 'manual' || size(self.recomputeLayers) > 0",
            message="recomputeLayers must list at least one layer in manual mode",
            check=lambda s: s.mode != "manual" or len(s.recompute_layers) > 0,
        ),
        Rule(
            cel="self.recomputeLayers.all(l, l >= 0)",
            message="recomputeLayers must be non-negative layer indices",
            check=lambda s: all(x >= 0 for x in s.recompute_layers),
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
        description="The OpenAI `model` name clients use; defaults to metadata.name.",
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
    )


WeightsSource.model_rebuild()
