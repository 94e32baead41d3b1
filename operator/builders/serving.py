"""Which pods serve which variants (pure): LoRA variants ride on their base's pods.

    serving_groups(inputs) -> [ServingGroup(host=base, adapters=(support, legal)), ServingGroup(host=full_ft)]
    unservable(variants)   -> ["ModelVariant 'x': ..."]   (resolve() refuses the fleet with these)

A group is one set of serving workloads (labelled with `group.name`): the host's weights (a base or a
full fine-tune) plus LoRA adapters applied per request. In every topology a LoRA variant joins the group of the fleet's plain variant with the same base weights, dtype and maxModelLen (the engine
batches base and adapters in one step; a LoRA variant without maxModelLen takes its host's); without such
a variant, LoRA variants of one base form a group of their own, serving only the adapters. The router
finds a variant's prefill/decode pods by its group's label (`router.json` `servedBy`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kvfleet.operator.api import ModelVariant

from .inputs import FleetInputs


@dataclass(frozen=True)
class ServingGroup:
    """One set of serving pods: the host variant's weights (None: only adapters are served) + adapters."""

    host: ModelVariant | None
    adapters: tuple[ModelVariant, ...] = ()

    @property
    def lead(self) -> ModelVariant:
        """The variant whose base weights the pods load (the host, else the first adapter's)."""
        return self.host if self.host is not None else self.adapters[0]

    @property
    def name(self) -> str:
        """The pods' variant label and the workloads' name part."""
        return self.lead.metadata.name

    @property
    def variants(self) -> tuple[ModelVariant, ...]:
        return ((self.host,) if self.host is not None else ()) + self.adapters


def is_lora(v: ModelVariant) -> bool:
    return v.spec.fine_tune is not None and v.spec.fine_tune.type == "lora"


def _base_key(v: ModelVariant) -> str:
    """What must be equal for a LoRA variant to run on another variant's pods (and maxModelLen, if set)."""
    return json.dumps([v.spec.base.to_k8s(), v.spec.dtype], sort_keys=True)


def _fits(lora: ModelVariant, group: ServingGroup) -> bool:
    return _base_key(lora) == _base_key(group.lead) and lora.spec.max_model_len in (None, group.lead.spec.max_model_len)


def serving_groups(inputs: FleetInputs) -> list[ServingGroup]:
    """The fleet's serving groups, in the order of its variants (deterministic)."""
    groups = [ServingGroup(v) for v in inputs.variants if not is_lora(v)]
    for v in inputs.variants:
        if not is_lora(v):
            continue
        # the first plain variant's group (no fine-tune of its own), else an adapters-only group
        at = next((i for i, g in enumerate(groups) if _fits(v, g)
                   and (g.host is None or g.host.spec.fine_tune is None)), None)
        if at is None:
            groups.append(ServingGroup(None, (v,)))
        else:
            groups[at] = ServingGroup(groups[at].host, groups[at].adapters + (v,))
    return groups


def unservable(variants: tuple[ModelVariant, ...]) -> list[str]:
    """Why some variants' weights cannot be served (empty: all can)."""
    out = []
    for v in variants:
        ft = v.spec.fine_tune
        if ft is None:
            continue
        name = v.metadata.name
        if ft.type == "lora" and ft.weights.builtin:
            out.append(f"ModelVariant {name!r}: fineTune.weights.builtin {ft.weights.builtin!r} is a whole model, "
                       "not a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors); use a pvc or "
                       "hostPath holding the adapter")
        if ft.type == "full" and ft.weights.builtin and ft.weights.builtin != v.spec.base.builtin:
            out.append(f"ModelVariant {name!r}: a full fine-tune must have its base's architecture; builtin "
                       f"{ft.weights.builtin!r} is not a fine-tune of {v.spec.base.to_k8s()}")
    return out
