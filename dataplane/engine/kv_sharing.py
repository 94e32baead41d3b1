"""Cross-variant KV reuse in the engine (DroidSpeak): the worker's side.

The scheduler finds, for a request of variant B, prompt blocks that sibling A has cached beyond B's
own hits (`Scheduler._sibling_hits`, keys under A's prefix key) and hands them over as a
`ScheduledReuse`. Before the step's forward, `CrossVariantReuse.run`:

1. copies A's blocks into B's fresh blocks (all layers' K/V and the stored hidden states);
2. for each recomputed group [i..j] of B's plan, runs B's layers i..j over those positions, starting
   from A's hidden state entering layer i (`kvcache.hidden.HiddenStore`; layer 0: B's embeddings),
   through the paged backend exactly like a prefill chunk, so B's K/V overwrite A's in those layers.

B's blocks are then ordinary computed blocks: the step goes on from the first position after them,
and `commit` registers them under B's own key. `tap_forward` is the forward every step runs when
hidden states are stored: the layers in segments, writing the hidden state entering each transition
layer for every token of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from kvfleet.dataplane.config import ConfigError, EngineConfig
from kvfleet.dataplane.engine.scheduler import ScheduledReuse, ScheduledSeq
from kvfleet.dataplane.kvcache.hidden import HiddenStore
from kvfleet.dataplane.kvsharing import layer_groups
from kvfleet.dataplane.model.lora import LoRABatch


class CrossVariantReuse:
    """Per receiving prefix key: the layer groups its variant recomputes on a sibling's KV."""

    def __init__(self, plans: Mapping[str, Sequence[int]]) -> None:
        """plans: receiver's prefix key -> the layers it recomputes."""
        self.groups = {key: layer_groups(layers) for key, layers in plans.items()}
        self.recomputed_tokens = 0  # positions x layers recomputed (the work sharing did not save)

    def run(self, runner: Any, jobs: Sequence[ScheduledReuse]) -> None:
        """Fill each job's blocks: copy the sibling's, then recompute the receiver's layer groups."""
        bs = runner.block_size
        model, kv = runner.model, runner.kv
        for job in jobs:
            seq = job.seq
            dst = seq.block_table[job.first_block:job.first_block + len(job.src_blocks)]
            for src_block, dst_block in zip(job.src_blocks, dst, strict=True):
                kv.copy_block(src_block, dst_block)
            groups = self.groups.get(seq.extra_key, [])
            if not groups:
                continue
            n = len(dst) * bs
            item = ScheduledSeq(seq, n, job.first_block * bs, False)
            input_ids, positions, meta, _, _ = runner.prepare([item])
            lora = None if runner.adapters is None else runner.adapters.batch([seq.adapter], [n])
            with torch.inference_mode():
                runner.attn.set_metadata(meta)
                for first, last in groups:
                    hidden = model.embed(input_ids) if first == 0 else kv.hidden.read(first, meta.slot_mapping)
                    model.run_layers(hidden, positions, runner.attn, first, last + 1, lora=lora)  # [n, H]
                    self.recomputed_tokens += n * (last + 1 - first)
                runner.attn.meta = None


def tap_forward(model: Any, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any,
                lora: LoRABatch | None, hidden_store: HiddenStore, slots: torch.Tensor) -> torch.Tensor:
    """model.forward, storing the hidden state entering each of the store's layers at `slots` [T]."""
    hidden = model.embed(input_ids)  # [T, H]
    start = 0
    for layer in hidden_store.layers:
        hidden = model.run_layers(hidden, positions, attn, start, layer, lora=lora)
        hidden_store.write(layer, slots, hidden)
        start = layer
    hidden = model.run_layers(hidden, positions, attn, start, None, lora=lora)
    normed: torch.Tensor = model.model.norm(hidden)
    return normed


def check_kv_sharing(config: EngineConfig, num_layers: int) -> None:
    """Refuse (ConfigError) a plan naming layers this model lacks or measured on another layer count."""
    for share in config.kv_sharing:
        where = f"kv_sharing {share.from_variant} -> {share.variant} ({share.source})"
        if share.num_layers is not None and share.num_layers != num_layers:
            raise ConfigError(f"{where}: measured on a {share.num_layers}-layer model, this one has {num_layers}")
        if share.recompute_layers and share.recompute_layers[-1] >= num_layers:
            raise ConfigError(f"{where}: layer {share.recompute_layers[-1]} does not exist ({num_layers} layers)")


def check_sharing_weights(config: EngineConfig, weights_of: Callable[[str], str]) -> None:
    """Refuse a profile measured on other weights than the variants served here (a retrained adapter)."""
    for share in config.kv_sharing:
        for variant, expected in ((share.from_variant, share.from_weights), (share.variant, share.to_weights)):
            actual = weights_of(variant)
            if expected is not None and actual != expected:
                raise ConfigError(f"kv_sharing {share.from_variant} -> {share.variant} ({share.source}): the "
                                  f"profile was measured on weights {expected or 'base'!r} of {variant}, "
                                  f"this engine serves {actual or 'base'!r}")
