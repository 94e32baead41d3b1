"""Our Llama (DenseAttention) against `transformers.LlamaForCausalLM` on the same tiny random weights."""

from __future__ import annotations

import pytest
import torch
from kvfleet.dataplane.model.attention import DenseAttention
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama

transformers = pytest.importorskip("transformers")

# float32 on CPU: the two implementations do the same math in a slightly different order.
ATOL_F32 = 1e-4

VARIANTS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa": {"num_key_value_heads": 1},
    "tied": {"tie_word_embeddings": True},
    "rope-llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "rope-linear": {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 500000.0},
    "bias": {"attention_bias": True},
    "head-dim-not-h-over-n": {"head_dim": 32, "num_hidden_layers": 3},
    "sharded": {"num_shards": 3},
}


def _ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant: str, tmp_path) -> None:
    model_dir = write_tiny_llama(tmp_path, seed=3, **VARIANTS[variant])
    ours, config = load_model(model_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = _ids(200, config.vocab_size)  # long enough to reach the scaled RoPE frequencies
    with torch.inference_mode():
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), DenseAttention()))  # [T, V]
        want = ref(ids[None]).logits[0].float()
    assert got.shape == want.shape == (200, config.vocab_size)
    diff = (got - want).abs().max().item()
    assert diff < ATOL_F32, f"{variant}: max |logit diff| = {diff:.2e}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bfloat16_logits_match_transformers_bfloat16(tiny_model_dir) -> None:
    # Same op order as the reference (f32 RMSNorm, RoPE in the activation dtype): observed bit-exact.
    ours, config = load_model(tiny_model_dir, dtype=torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    ids = _ids(64, config.vocab_size)
    with torch.inference_mode():
        got = ours.compute_logits(ours(ids, torch.arange(64), DenseAttention()))
        want = ref(ids[None]).logits[0].float()
    assert (got - want).abs().max().item() < 0.05


def test_tied_model_shares_one_tensor(tmp_path) -> None:
    ours, _ = load_model(write_tiny_llama(tmp_path, tie_word_embeddings=True), dtype=torch.float32)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_incremental_decoding_equals_full_forward(tiny_model_dir) -> None:
    model, config = load_model(tiny_model_dir, dtype=torch.float32)
    ids = _ids(40, config.vocab_size, seed=7)
    with torch.inference_mode():
        full = model.compute_logits(model(ids, torch.arange(40), DenseAttention()))  # [40, V]
        attn = DenseAttention()
        steps = [model.compute_logits(model(ids[:25], torch.arange(25), attn))]  # prefill
        for p in range(25, 40):  # then one token at a time
            steps.append(model.compute_logits(model(ids[p:p + 1], torch.tensor([p]), attn)))
    incremental = torch.cat(steps)
    assert (incremental - full).abs().max().item() < 1e-5


def test_run_layers_can_resume_from_a_stored_hidden_state(tiny_model_dir) -> None:
    model, config = load_model(tiny_model_dir, dtype=torch.float32)
    ids, pos = _ids(12, config.vocab_size), torch.arange(12)
    with torch.inference_mode():
        full = model(ids, pos, DenseAttention())
        attn = DenseAttention()
        mid = model.run_layers(model.embed(ids), pos, attn, 0, 1)
        resumed = model.model.norm(model.run_layers(mid, pos, attn, 1))
    assert torch.allclose(full, resumed)


def test_bfloat16_stays_close_to_float32(tiny_model_dir) -> None:
    f32, config = load_model(tiny_model_dir, dtype=torch.float32)
    bf16, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = _ids(30, config.vocab_size)
    with torch.inference_mode():
        a = f32.compute_logits(f32(ids, torch.arange(30), DenseAttention()))
        b = bf16.compute_logits(bf16(ids, torch.arange(30), DenseAttention()))
    assert b.dtype == torch.float32
    # bf16 keeps ~3 significant digits; logits here are O(10)
    assert (a - b).abs().max().item() < 0.5
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_model_dir) -> None:
    cpu, config = load_model(tiny_model_dir, dtype=torch.float32)
    gpu, _ = load_model(tiny_model_dir, dtype=torch.float32, device="cuda")
    ids = _ids(50, config.vocab_size)
    with torch.inference_mode():
        a = cpu.compute_logits(cpu(ids, torch.arange(50), DenseAttention()))
        b = gpu.compute_logits(gpu(ids.cuda(), torch.arange(50, device="cuda"), DenseAttention()))
    assert (a - b.cpu()).abs().max().item() < 1e-3
