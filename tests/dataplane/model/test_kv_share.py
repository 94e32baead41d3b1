"""DroidSpeak reuse at the model level (kv_share.py) on tiny random siblings: a base, full fine-tunes
(perturbed copies) and a LoRA adapter, each checked against plain forwards over the dense backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kvfleet.dataplane.model.attention import DenseAttention
from kvfleet.dataplane.model.kv_share import (
    capture_prefix,
    continuation_logits,
    load_variant,
    lora_for,
    shared_prefix_cache,
)
from kvfleet.dataplane.model.llama import apply_rope
from kvfleet.dataplane.model.loader import safetensors_files
from kvfleet.dataplane.model.lora import CONFIG_FILE, WEIGHTS_FILE, weights_identity
from kvfleet.dataplane.model.tiny import write_perturbed_copy, write_random_lora, write_tiny_llama

LAYERS, P, C = 5, 20, 7
ATOL = 1e-5


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Variants on one tiny base: name -> Variant ('late' differs from the base in layers 3.. only)."""
    root = tmp_path_factory.mktemp("kvshare")
    base = write_tiny_llama(root / "base", seed=0, num_hidden_layers=LAYERS)
    dirs = {"base": base, "full": write_perturbed_copy(root / "full", base, seed=1, scale=0.2),
            "late": write_perturbed_copy(root / "late", base, seed=2, scale=0.5, layers=(3, 4)),
            "lora": write_random_lora(root / "lora", base, rank=4, seed=3, std=0.3)}
    models: dict = {}
    return {name: load_variant(d, base, models=models) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 384, (P + C,), generator=gen)
    return ids[:P], ids[P:]


def own_logits(v, prefix, cont) -> torch.Tensor:
    """B's own full prefill of prefix + continuation in one forward; the continuation's logits [C, V]."""
    ids = torch.cat([prefix, cont])
    with torch.inference_mode():
        hidden = v.model(ids, torch.arange(len(ids)), DenseAttention(), lora_for(v.adapter, len(ids)))
        return v.model.compute_logits(hidden)[P:]


def shared(a, b, prefix, cont, layers) -> torch.Tensor:
    cache = shared_prefix_cache(b.model, capture_prefix(a.model, prefix, a.adapter), prefix, layers, b.adapter)
    return continuation_logits(b.model, cache, cont, P, b.adapter)


def test_capture_holds_what_the_backend_stores_and_each_layers_input(family, tokens) -> None:
    v, (prefix, _) = family["full"], tokens
    cap = capture_prefix(v.model, prefix)
    attn = DenseAttention()
    with torch.inference_mode():
        v.model(prefix, torch.arange(P), attn)
        assert torch.equal(cap.hidden[0], v.model.embed(prefix))
        for layer in range(LAYERS):
            assert cap.k[layer].shape == (P, 2, 16) and cap.hidden[layer].shape == (P, 64)
            assert torch.allclose(cap.k[layer], attn.k[layer], atol=ATOL)
            assert torch.allclose(cap.v[layer], attn.v[layer], atol=ATOL)
            if layer:  # the hidden entering a layer is what the layers before it make of the embeddings
                ref = v.model.run_layers(cap.hidden[0], torch.arange(P), DenseAttention(), 0, layer)
                assert torch.allclose(cap.hidden[layer], ref, atol=ATOL)


@pytest.mark.parametrize("pair", [("base", "full"), ("full", "lora"), ("lora", "late")])
def test_recomputing_every_layer_is_b_own_prefill(family, tokens, pair) -> None:
    a, b = family[pair[0]], family[pair[1]]
    got = shared(a, b, *tokens, range(LAYERS))
    assert torch.allclose(got, own_logits(b, *tokens), atol=ATOL)


@pytest.mark.parametrize("pair", [("base", "full"), ("base", "lora"), ("lora", "full")])
def test_recomputing_nothing_attends_exactly_a_kv(family, tokens, pair) -> None:
    a, b = family[pair[0]], family[pair[1]]
    prefix, cont = tokens
    a_cache = DenseAttention()  # A's plain prefill, then B's forward over the continuation on top of it
    with torch.inference_mode():
        a.model(prefix, torch.arange(P), a_cache, lora_for(a.adapter, P))
        want = b.model.compute_logits(b.model(cont, torch.arange(P, P + C), a_cache, lora_for(b.adapter, C)))
    got = shared(a, b, prefix, cont, [])
    assert torch.allclose(got, want, atol=ATOL)
    assert not torch.allclose(got, own_logits(b, prefix, cont), atol=1e-3)  # the siblings do differ


def test_a_group_starts_from_a_hidden_state(family, tokens) -> None:
    a, b, prefix = family["base"], family["full"], tokens[0]
    cap = capture_prefix(a.model, prefix)
    cache = shared_prefix_cache(b.model, cap, prefix, [2, 3])
    layer = b.model.model.layers[2].self_attn  # B's layer 2 K/V from A's hidden entering layer 2, by hand
    with torch.inference_mode():
        x = b.model.model.layers[2].input_layernorm(cap.hidden[2])
        _, k, v = layer.qkv_proj(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        cos, sin = b.model.rotary.cos_sin(torch.arange(P), x.dtype)
    assert torch.allclose(cache.k[2], apply_rope(k.view(P, 2, 16), cos, sin), atol=ATOL)
    assert torch.allclose(cache.v[2], v.view(P, 2, 16), atol=ATOL)
    assert not torch.allclose(cache.k[3], cap.k[3], atol=1e-3)  # recomputed by B
    for kept in (0, 1, 4):
        assert torch.equal(cache.k[kept], cap.k[kept]) and torch.equal(cache.v[kept], cap.v[kept])


def test_a_sibling_equal_below_a_layer_needs_only_the_layers_from_there(family, tokens) -> None:
    """'late' equals the base in layers 0-2, so A's hidden entering layer 3 is B's own: recomputing 3-4
    from it is B's own prefill, while dropping layer 3 from the plan is not."""
    a, b = family["base"], family["late"]
    assert torch.allclose(shared(a, b, *tokens, [3, 4]), own_logits(b, *tokens), atol=ATOL)
    assert not torch.allclose(shared(a, b, *tokens, [4]), own_logits(b, *tokens), atol=1e-3)


@pytest.mark.parametrize("name", ["full", "lora"])
def test_a_variant_sharing_with_itself_deviates_nowhere(family, tokens, name) -> None:
    v = family[name]
    want = own_logits(v, *tokens)
    gen = torch.Generator().manual_seed(11)
    plans = [[], list(range(LAYERS)), [0], [4], [1, 3], [0, 1, 4]]
    plans += [sorted(torch.randperm(LAYERS, generator=gen)[:k].tolist()) for k in (1, 2, 3)]
    for plan in plans:
        assert torch.allclose(shared(v, v, *tokens, plan), want, atol=ATOL), plan


def test_lora_changes_the_model_it_rides_on(family, tokens) -> None:
    lora, prefix = family["lora"], tokens[0]
    assert not torch.allclose(own_logits(lora, *tokens), own_logits(family["base"], *tokens), atol=1e-3)
    assert lora.model is family["base"].model  # one base in memory for its adapters
    by_batch = capture_prefix(lora.model, prefix, lora_for(lora.adapter, P))  # a ready LoRABatch does too
    assert torch.equal(by_batch.k[-1], capture_prefix(lora.model, prefix, lora.adapter).k[-1])
    with pytest.raises(ValueError, match="covers"):
        capture_prefix(lora.model, prefix, lora_for(lora.adapter, P + 1))


def test_load_variant_names_weights_as_the_prefix_key_does(family, tmp_path) -> None:
    base, full, lora = family["base"], family["full"], family["lora"]
    assert base.weights_id == "" and base.adapter is None
    assert full.weights_id == weights_identity(*safetensors_files(Path(full.path)))
    lora_dir = lora.path
    assert lora.weights_id == weights_identity(f"{lora_dir}/{CONFIG_FILE}", f"{lora_dir}/{WEIGHTS_FILE}")
    assert lora.adapter is not None and lora.model_dir == base.model_dir
    assert load_variant(full.path).weights_id == full.weights_id  # no base given: a fine-tune
    orphan = write_random_lora(tmp_path / "orphan", base.model_dir)
    (orphan / CONFIG_FILE).write_text((orphan / CONFIG_FILE).read_text().replace(base.model_dir, "/nonexistent"))
    with pytest.raises(FileNotFoundError, match="base model"):
        load_variant(orphan)


def test_inputs_that_do_not_match_are_refused(family, tokens) -> None:
    a, prefix = family["base"], tokens[0]
    cap = capture_prefix(a.model, prefix)
    with pytest.raises(ValueError, match="input_ids differ"):
        shared_prefix_cache(a.model, cap, prefix.flip(0), [0])
    with pytest.raises(ValueError, match="outside"):
        shared_prefix_cache(a.model, cap, prefix, [LAYERS])
    with pytest.raises(ValueError, match="expected"):
        continuation_logits(a.model, cap.cache(), tokens[1], P + 1)
