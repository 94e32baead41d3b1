"""LoRA variants and full fine-tunes in the engine, against `peft` and `transformers` (fp32, greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kvfleet.dataplane.config import AdapterConfig, ConfigError, EngineConfig
from kvfleet.dataplane.engine.api import GenerationRequest, InvalidRequest, SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.model.lora import AdapterError, read_adapter_config
from kvfleet.dataplane.model.tiny import write_random_lora, write_tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# three adapters that touch different modules with different ranks and scales
ADAPTERS = {"all-r8": dict(rank=8, alpha=16.0, target_modules=ALL, seed=1),
            "attn-r4": dict(rank=4, alpha=4.0, target_modules=("q_proj", "v_proj", "o_proj"), seed=2),
            "mlp-r16": dict(rank=16, alpha=8.0, target_modules=("gate_proj", "up_proj", "down_proj"), seed=3)}
PROMPTS = [[0, 17, 42, 99, 7, 250, 31], [0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
           [0, 300, 200, 100], [0, 64, 65, 66, 67, 68]]


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_llama(root / "base", seed=0)
    return base, {name: write_random_lora(root / name, base, **kw) for name, kw in ADAPTERS.items()}


def _config(base: Path, adapters: dict[str, Path], **kw) -> EngineConfig:
    specs = tuple(AdapterConfig(name, str(d), ADAPTERS[name]["rank"], ADAPTERS[name]["alpha"])
                  for name, d in adapters.items())
    return EngineConfig(model_dir=str(base), variant="base", dtype="float32", device="cpu", num_kv_blocks=256,
                        adapters=specs, **kw)


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding (no eos handling: `generate` would ban eos for min_new_tokens)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_adapters_equal_peft_token_for_token(lora_setup) -> None:
    base, adapters = lora_setup
    engine = LLMEngine.from_config(_config(base, adapters))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_tokens = [o.new_token_ids for o in engine.generate(PROMPTS, GREEDY, variant="base")]
    assert base_tokens == [_hf_greedy(hf_base, p, 12) for p in PROMPTS]
    for name, adir in adapters.items():
        ref = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adir).eval()
        want = [_hf_greedy(ref, p, 12) for p in PROMPTS]
        got = [o.new_token_ids for o in engine.generate(PROMPTS, GREEDY, variant=name)]
        assert got == want, name
        assert got != base_tokens, f"{name} should change the output"


def test_mixed_batch_equals_each_alone(lora_setup) -> None:
    base, adapters = lora_setup
    engine = LLMEngine.from_config(_config(base, adapters))
    variants = ["base", *adapters]  # base + three adapters
    alone = {v: engine.generate([PROMPTS[i]], GREEDY, variant=v)[0].new_token_ids for i, v in enumerate(variants)}
    steps: list[int] = []
    real = engine.runner.adapters.batch

    def spy(seq_adapters, counts):
        steps.append(len({a for a in seq_adapters}))
        return real(seq_adapters, counts)

    engine.runner.adapters.batch = spy
    for i, v in enumerate(variants):
        engine.add_request(GenerationRequest(f"r{i}", PROMPTS[i], GREEDY, variant=v))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    assert steps[0] == 4, "base and three adapters ran in one step"
    assert [got[f"r{i}"] for i in range(4)] == [alone[v] for v in variants]


def test_adapter_memory_bound_evicts_lru_and_reloads(lora_setup) -> None:
    base, adapters = lora_setup
    probe = LLMEngine.from_config(_config(base, adapters))
    sizes = probe.adapters.sizes
    bound = sizes["all-r8"] + sizes["mlp-r16"]  # room for two of them, not three
    engine = LLMEngine.from_config(_config(base, adapters, adapter_memory_bytes=bound, max_active_adapters=1))
    mgr = engine.adapters
    assert mgr.bytes_used == 0 and not mgr.resident  # loaded on first use, not before
    first = engine.generate([PROMPTS[0]], GREEDY, variant="all-r8")[0].new_token_ids
    engine.generate([PROMPTS[0]], GREEDY, variant="mlp-r16")
    assert list(mgr.resident) == ["all-r8", "mlp-r16"] and mgr.stats.evictions == 0
    engine.generate([PROMPTS[0]], GREEDY, variant="attn-r4")  # evicts the least recently used: all-r8
    assert list(mgr.resident) == ["mlp-r16", "attn-r4"] and mgr.stats.evictions == 1
    assert mgr.bytes_used == sizes["mlp-r16"] + sizes["attn-r4"] <= bound
    again = engine.generate([PROMPTS[0]], GREEDY, variant="all-r8")[0].new_token_ids  # reloaded
    assert again == first and mgr.stats.loads == 4 and "all-r8" in mgr.resident
    assert mgr.bytes_used == sum(a.nbytes for a in mgr.resident.values()) <= bound
    # the step stacks hold only the last step's adapter set
    assert mgr.stack_bytes == sizes["all-r8"]


def test_three_adapters_in_one_batch_respect_max_active(lora_setup) -> None:
    base, adapters = lora_setup
    engine = LLMEngine.from_config(_config(base, adapters, max_active_adapters=2))
    seen: list[set] = []
    real = engine.runner.adapters.batch
    engine.runner.adapters.batch = lambda a, c: (seen.append({x for x in a if x}), real(a, c))[1]
    for i, v in enumerate(adapters):
        engine.add_request(GenerationRequest(f"r{i}", PROMPTS[i], GREEDY, variant=v))
    while engine.has_unfinished():
        engine.step()
    assert max(len(s) for s in seen) == 2 and set().union(*seen) == set(adapters)


def test_variants_never_share_prefix_cache(lora_setup) -> None:
    base, adapters = lora_setup
    engine = LLMEngine.from_config(_config(base, adapters))
    prompt = PROMPTS[1]  # 17 tokens: one full block
    engine.generate([prompt], GREEDY, variant="all-r8")
    assert engine.generate([prompt], GREEDY, variant="base")[0].num_cached_prompt_tokens == 0
    assert engine.generate([prompt], GREEDY, variant="attn-r4")[0].num_cached_prompt_tokens == 0
    assert engine.generate([prompt], GREEDY, variant="all-r8")[0].num_cached_prompt_tokens == 16


def test_unknown_variant_and_bad_adapters_are_refused(lora_setup, tmp_path) -> None:
    base, adapters = lora_setup
    engine = LLMEngine.from_config(_config(base, adapters))
    with pytest.raises(InvalidRequest, match="not 'nope'"):
        engine.add_request(GenerationRequest("x", PROMPTS[0], GREEDY, variant="nope"))
    with pytest.raises(ConfigError, match="declared rank 9"):
        LLMEngine.from_config(EngineConfig(model_dir=str(base), variant="base", dtype="float32", num_kv_blocks=64,
                                           adapters=(AdapterConfig("a", str(adapters["all-r8"]), 9, 16.0),)))
    with pytest.raises(ConfigError, match="cannot hold"):
        LLMEngine.from_config(_config(base, adapters, adapter_memory_bytes=1000))
    dora = write_random_lora(tmp_path / "dora", base, rank=2, alpha=2.0)
    (dora / "adapter_config.json").write_text(
        (dora / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter_config(dora)


def test_full_fine_tune_equals_transformers_and_uses_the_base_tokenizer(lora_setup, tmp_path) -> None:
    base, _ = lora_setup
    ft = write_tiny_llama(tmp_path / "ft", seed=7)  # other weights, same architecture
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ft / f).unlink()  # a fine-tune without its own tokenizer: the base's is used
    cfg = EngineConfig(model_dir=str(base), variant="ft", fine_tune_dir=str(ft), dtype="float32", num_kv_blocks=128)
    engine = LLMEngine.from_config(cfg)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    got = [o.new_token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert got == [_hf_greedy(ref, p, 12) for p in PROMPTS]
    base_engine = LLMEngine.from_config(EngineConfig(model_dir=str(base), variant="ft", dtype="float32",
                                                     num_kv_blocks=128))
    assert got != [o.new_token_ids for o in base_engine.generate(PROMPTS, GREEDY)]
    assert engine.weights_id and engine.runner.structured is not None  # the base's tokenizer.json was found
    # same variant name, other weights: a different prefix key (no stale KV through the pool)
    assert engine.new_sequence(GenerationRequest("a", PROMPTS[0])).extra_key != \
        base_engine.new_sequence(GenerationRequest("a", PROMPTS[0])).extra_key


def _steps(engine, rid: str) -> list[int]:
    toks = []
    while engine.has_unfinished():
        toks += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    return toks


def test_prefill_to_decode_hand_off_carries_the_adapter_through_the_variant(lora_setup) -> None:
    from dataclasses import replace

    base, adapters = lora_setup
    want = LLMEngine.from_config(_config(base, adapters)).generate([PROMPTS[1]], GREEDY, variant="attn-r4")[0]
    prefill = LLMEngine.from_config(_config(base, adapters))
    prefill.add_request(GenerationRequest("r", PROMPTS[1], replace(GREEDY, max_tokens=1), variant="attn-r4",
                                          export_kv=True))
    first = [o for o in (o for _ in range(4) for o in prefill.step()) if o.finished][0]
    decode = LLMEngine.from_config(_config(base, adapters, max_active_adapters=1))
    assert decode.reserve("r", len(PROMPTS[1]), GREEDY.max_tokens)
    assert decode.add_prefilled(GenerationRequest("r", PROMPTS[1], GREEDY, variant="attn-r4"),
                                first.new_token_ids[0], first.kv) is False  # the pushed KV was used
    assert first.new_token_ids + _steps(decode, "r") == want.new_token_ids
    # the decode engine is at its adapter cap (another adapter runs): the hand-off queues as a recompute
    decode.add_request(GenerationRequest("busy", PROMPTS[0], GREEDY, variant="all-r8"))
    decode.step()
    assert decode.reserve("r2", len(PROMPTS[1]), GREEDY.max_tokens)
    assert decode.add_prefilled(GenerationRequest("r2", PROMPTS[1], GREEDY, variant="attn-r4"),
                                first.new_token_ids[0], first.kv) is True
    assert first.new_token_ids + _steps(decode, "r2") == want.new_token_ids
