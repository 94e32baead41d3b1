"""Cross-variant KV reuse (DroidSpeak) in the engine: LoRA siblings on one tiny base, fp32, greedy."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvfleet.dataplane.config import AdapterConfig, ConfigError, EngineConfig, KVShareConfig
from kvfleet.dataplane.engine.api import SamplingParams
from kvfleet.dataplane.engine.llm_engine import LLMEngine
from kvfleet.dataplane.kvcache import transfer
from kvfleet.dataplane.model.tiny import write_random_lora, write_tiny_llama

LAYERS = 6
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPT = [0] + list(range(40, 90))  # 51 tokens: 3 full blocks reusable (the last token is always computed)


@pytest.fixture(scope="module")
def siblings(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("share")
    base = write_tiny_llama(root / "base", seed=0, num_hidden_layers=LAYERS)
    return (base, write_random_lora(root / "a", base, rank=4, alpha=8.0, seed=1, std=0.2),
            write_random_lora(root / "b", base, rank=4, alpha=8.0, seed=2, std=0.2))


def engine(siblings: tuple[Path, Path, Path], sharing: tuple[KVShareConfig, ...] = (), **kw) -> LLMEngine:
    base, a, b = siblings
    return LLMEngine.from_config(EngineConfig(
        model_dir=str(base), variant="base", dtype="float32", device="cpu", num_kv_blocks=128,
        adapters=(AdapterConfig("a", str(a)), AdapterConfig("b", str(b))), kv_sharing=sharing, **kw))


def share(layers: tuple[int, ...], **kw) -> tuple[KVShareConfig, ...]:
    return (KVShareConfig("b", "a", layers, **kw),)


def run(eng: LLMEngine, variant: str, prompt: list[int] = PROMPT) -> tuple[list[int], int]:
    out = eng.generate([prompt], GREEDY, variant=variant)[0]
    return out.new_token_ids, out.num_cached_prompt_tokens


def test_sharing_configured_changes_nothing_until_a_sibling_has_cached_the_prefix(siblings) -> None:
    plain, shared = engine(siblings), engine(siblings, share((0, 3, 4)))
    for variant in ("b", "a", "base"):  # b first: a has cached nothing yet. The tapped forward (hidden states stored) equals the plain one
        assert run(shared, variant) == run(plain, variant)
    assert shared.stats().shared_prefix_tokens == 0


def test_recomputing_every_layer_equals_the_variants_own_prefill(siblings) -> None:
    own = run(engine(siblings), "b")[0]
    eng = engine(siblings, share(tuple(range(LAYERS))))
    run(eng, "a")  # a computes and caches the prompt
    tokens, cached = run(eng, "b")
    assert tokens == own and cached == 0
    assert eng.stats().shared_prefix_tokens == 48
    assert eng.runner.sharing.recomputed_tokens == 48 * LAYERS
    # b's blocks are its own now: the next b request is a plain prefix hit
    assert run(eng, "b") == (own, 48) and eng.stats().shared_prefix_tokens == 48


def test_reusing_every_layer_attends_the_siblings_kv(siblings) -> None:
    own = run(engine(siblings), "b")[0]
    eng = engine(siblings, share(()))
    run(eng, "a")
    reused, _ = run(eng, "b")
    assert eng.stats().shared_prefix_tokens == 48 and eng.runner.sharing.recomputed_tokens == 0
    assert reused != own  # random siblings with std 0.2 disagree: the KV really came from a
    # a partial plan sits between: the middle group starts from a's stored hidden state at layer 3
    part = engine(siblings, share((0, 3, 4)))
    run(part, "a")
    assert part.worker.kv.hidden.layers == (3,)
    tokens, _ = run(part, "b")
    assert part.runner.sharing.recomputed_tokens == 48 * 3 and len(tokens) == GREEDY.max_tokens


def test_blocks_filled_from_elsewhere_are_not_reused_across_variants(siblings) -> None:
    eng = engine(siblings, share((0, 3)))
    run(eng, "a")
    for block in range(eng.scheduler.bm.num_blocks):  # as if the pool or a prefill pod had written them
        transfer.write_block(eng.worker.kv, block, transfer.read_block(eng.worker.kv, block))
    run(eng, "b")
    assert eng.stats().shared_prefix_tokens == 0


def test_plans_that_do_not_fit_the_engine_are_refused(siblings) -> None:
    with pytest.raises(ConfigError, match="layer 6 does not exist"):
        engine(siblings, share((0, LAYERS)))
    with pytest.raises(ConfigError, match="measured on a 30-layer model"):
        engine(siblings, share((0,), num_layers=30))
    with pytest.raises(ConfigError, match="measured on weights"):
        engine(siblings, share((0,), from_weights="0123456789abcdef"))
    with pytest.raises(ConfigError, match="both must be served"):
        engine(siblings, (KVShareConfig("b", "other", (0,)),))
    with pytest.raises(ConfigError, match="unquantized"):
        EngineConfig(model_dir="m", variant="a", kv_sharing=(KVShareConfig("a", "b", (0,)),),
                     adapters=(AdapterConfig("b", "d"),),
                     cache_policy=EngineConfig(model_dir="m").cache_policy.__class__(key_quantization="int8",
                                                                                     value_quantization="int8"))


def test_the_engine_applies_a_plan_exactly_as_the_profiler_measures_it(siblings) -> None:
    """The paged engine (copy, recompute from the stored hidden state, then B's own chunk) equals the dense
    reference the profiler scores plans with (`model/kv_share.py`), token for token."""
    import torch
    from kvfleet.dataplane.model.kv_share import (
        capture_prefix,
        continuation_logits,
        load_variant,
        shared_prefix_cache,
    )

    base, a_dir, b_dir = siblings
    plan = (0, 3, 4)  # two groups: [0] from b's embeddings, [3..4] from a's hidden state entering layer 3
    eng = engine(siblings, share(plan))
    run(eng, "a")
    tokens, _ = run(eng, "b")
    models: dict = {}
    a, b = load_variant(a_dir, base, models=models), load_variant(b_dir, base, models=models)
    ids = torch.tensor(PROMPT)
    reused = 48  # the engine reuses whole blocks; the rest of the prompt is b's own chunk
    with torch.inference_mode():
        cache = shared_prefix_cache(b.model, capture_prefix(a.model, ids[:reused], lora=a.adapter), ids[:reused],
                                    plan, lora_b=b.adapter)
        want: list[int] = []
        for _ in range(GREEDY.max_tokens):
            cont = torch.tensor(PROMPT[reused:] + want)
            logits = continuation_logits(b.model, cache, cont, offset=reused, lora=b.adapter)
            want.append(int(logits[-1].argmax()))
    assert tokens == want
