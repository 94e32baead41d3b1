"""LookaheadKV training (seeded, deterministic) and the evaluator's lookahead and H2O prompt compression."""

from __future__ import annotations

import random

import pytest
import torch
from kvfleet.dataplane.kvcache.eviction import EvictionSpec, snapkv_scores
from kvfleet.dataplane.kvcache.policy import PolicyAttention, PolicySpec, QuantSpec
from kvfleet.dataplane.model.loader import load_model
from kvfleet.dataplane.model.tiny import write_tiny_llama

from kvfleet.tools import lookahead_train as lt
from kvfleet.tools.eval_tf import prefill, score

RECIPE = lt.Recipe(prompt_lengths=(24, 32), future_tokens=8, train_windows=4, heldout_windows=2, steps=30,
                   windows_per_step=2, lr=2e-2, num_tokens=2, rank=2, sinks=2, window=4, pooling_kernel=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny"))
    model, cfg = load_model(d, dtype=torch.float32, device="cpu")
    return d, model, cfg


def _texts(cfg, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, cfg.vocab_size) for _ in range(400)] for _ in range(2)]


def _rope(model):
    return lambda pos: model.rotary.cos_sin(pos, torch.float32)


def test_training_is_seeded_and_deterministic(tiny):
    _, model, cfg = tiny
    a, rec = lt.train(model, cfg, _texts(cfg), RECIPE)
    b, _ = lt.train(model, cfg, _texts(cfg), RECIPE)
    c, _ = lt.train(model, cfg, _texts(cfg), lt.Recipe(**{**RECIPE.__dict__, "seed": 1}))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.lora_a, c.lora_a)
    assert rec["loss_last"] < rec["loss_first"]  # it learns the target on its training windows
    assert set(rec["heldout_captured_after"]) == {"lookahead", "snapkv", "oracle"}
    assert rec["heldout_captured_after"]["oracle"] >= rec["heldout_captured_after"]["lookahead"]


def test_target_is_the_future_tokens_attention_on_the_prompt(tiny):
    _, model, cfg = tiny
    recipe = lt.Recipe(prompt_lengths=(20,), future_tokens=6)
    ids = _texts(cfg)[0][:26]
    (w,) = lt.make_windows(model, [ids], recipe, 0, 1)
    assert w.keys[0].shape == (20, cfg.num_key_value_heads, cfg.head_dim) and w.target[0].shape == (20, 2)
    # the target's total per head: 6 queries x group, minus what they put on the 6 future rows
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    assert all(((t.sum(0) > 0) & (t.sum(0) < 6 * group)).all() for t in w.target)
    # a different continuation gives a different target on the same prompt
    (w2,) = lt.make_windows(model, [ids[:20] + [5, 6, 7, 8, 9, 10]], recipe, 0, 1)
    assert torch.equal(w2.keys[0], w.keys[0]) and not torch.allclose(w2.target[-1], w.target[-1])


def test_kl_loss_is_zero_at_the_target_and_positive_elsewhere():
    t = [torch.rand(30, 2) + 0.1]
    assert float(lt.kl_loss([t[0] * 3.0], t, 2, 4)) == pytest.approx(0.0, abs=1e-6)
    assert float(lt.kl_loss([torch.rand(30, 2) + 0.1], t, 2, 4)) > 1e-3


def test_lookahead_feeds_the_same_keep_mask_path_as_snapkv(tiny):
    """A scorer that returns SnapKV's raw votes makes the lookahead row equal the SnapKV row."""
    _, model, cfg = tiny
    rng = random.Random(3)
    ids = [rng.randrange(1, cfg.vocab_size) for _ in range(70)]
    pre = prefill(model, ids[:50])
    n, h = 50, cfg.num_key_value_heads
    pos = torch.arange(n)[:, None].expand(n, h)

    seen = []

    def votes(p):  # SnapKV's votes over the computed keys (the scorer itself is handed the stored rows)
        seen.append(p)
        return [snapkv_scores(q, torch.arange(n - q.shape[0], n), k, pos, 1)
                for q, k in zip(p.q_win, pre.k, strict=True)]

    ev = dict(budget_ratio=0.4, window_tokens=4, sink_tokens=2, pooling_kernel=5)
    q = QuantSpec("int4", group_size=8, residual_tokens=4, sink_tokens=2)
    snap, snap_attn = score(model, PolicySpec(q, EvictionSpec("snapkv", **ev)), pre, ids[50:], _rope(model))
    la, la_attn = score(model, PolicySpec(q, EvictionSpec("lookahead", **ev)), pre, ids[50:], _rope(model),
                        scorer=votes)
    assert torch.equal(snap, la)
    # the module reads the prompt as the cache stores it: every row through the int4 codec
    kc, _ = PolicySpec(q, EvictionSpec("lookahead", **ev)).codecs(h, cfg.head_dim, torch.float32)
    stored = seen[0].k[0]
    assert not torch.equal(stored, pre.k[0])
    assert torch.allclose(stored[8:40], kc.decode(kc.encode(pre.k[0][8:40].bfloat16().float())), atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(snap_attn.keep, la_attn.keep, strict=True))
    assert la_attn.select_s > 0
    other, _ = score(model, PolicySpec(q, EvictionSpec("lookahead", **ev)), pre, ids[50:], _rope(model),
                     scorer=lambda p: [torch.rand(n, h, generator=torch.Generator().manual_seed(0)) for _ in p.k])
    assert not torch.equal(other, snap)
    with pytest.raises(ValueError, match="trained module"):
        score(model, PolicySpec(q, EvictionSpec("lookahead", **ev)), pre, ids[50:], _rope(model))


@pytest.mark.parametrize("policy", ["h2o", "snapkv"])
def test_prompt_compression_equals_stepwise_decoding_after_one_eviction(tiny, policy):
    """PolicyAttention ingesting the 40-token prompt in one chunk evicts once to 20 rows (budget 25,
    slack 5) and keeps every decoded token for 5 steps: teacher-forced compression to 50% must match."""
    _, model, cfg = tiny
    rng = random.Random(4)
    ids = [rng.randrange(1, cfg.vocab_size) for _ in range(46)]
    stepwise = PolicySpec(eviction=EvictionSpec(policy, budget_tokens=25, slack_tokens=5, window_tokens=4,
                                                sink_tokens=2))
    attn = PolicyAttention(stepwise, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                           fp_store_dtype=torch.bfloat16)
    want = []
    with torch.inference_mode():
        hid = model(torch.tensor(ids[:40]), torch.arange(40), attn)
        assert attn.tokens_stored() == 20 * cfg.num_hidden_layers
        for i in range(40, 46):
            want.append(-torch.log_softmax(model.compute_logits(hid[-1:])[0], -1)[ids[i]])
            hid = model(torch.tensor([ids[i]]), torch.tensor([i]), attn)
    ratio = PolicySpec(eviction=EvictionSpec(policy, budget_ratio=0.5, window_tokens=4, sink_tokens=2))
    got, tf = score(model, ratio, prefill(model, ids[:40], full_q=policy == "h2o"), ids[40:46], _rope(model))
    assert tf.kept_prompt_rows() == 20
    assert torch.allclose(got, torch.stack(want), atol=2e-4), (got - torch.stack(want)).abs().max()
    base, _ = score(model, PolicySpec(), prefill(model, ids[:40]), ids[40:46], _rope(model))
    assert not torch.allclose(got[1:], base[1:], atol=1e-3)


def test_h2o_needs_the_recorded_queries(tiny):
    _, model, cfg = tiny
    ids = list(range(5, 55))
    spec = PolicySpec(eviction=EvictionSpec("h2o", budget_ratio=0.5, window_tokens=4, sink_tokens=2))
    with pytest.raises(ValueError, match="full_q"):
        score(model, spec, prefill(model, ids[:40]), ids[40:], _rope(model))
    part = prefill(model, ids[:40], full_q=True, prefix=prefill(model, ids[:25], full_q=True))
    whole = prefill(model, ids[:40], full_q=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(part.q_all, whole.q_all, strict=True))


def test_evaluator_runs_lookahead_end_to_end(tiny, tmp_path):
    """`kvfleet eval-cache` with a lookahead and an H2O CachePolicy on a tiny model and a trained module."""
    import json

    from kvfleet.tools import eval_cache
    from kvfleet.tools import eval_quality as eq

    d, model, cfg = tiny
    mod, rec = lt.train(model, cfg, _texts(cfg), RECIPE)
    mod.save(tmp_path / "la-1", rec)
    pol = tmp_path / "p.yaml"
    pol.write_text("metadata: {name: la50}\nspec:\n  eviction: {policy: lookahead, budgetRatio: 0.5, windowTokens: 4, "
                   "sinkTokens: 2, poolingKernel: 3}\n---\nmetadata: {name: h2o50}\nspec:\n  eviction: {policy: h2o, "
                   "budgetRatio: 0.5, windowTokens: 4, sinkTokens: 2}\n")
    out = tmp_path / "out"
    assert eval_cache.main(["--model", str(d), "--policy", str(pol), "--out", str(out), "--ppl-seqs", "64:2",
                            "--passkey-lengths", "96", "--passkey-trials", "2", "--multifact-haystacks", "1",
                            "--multifact-length", "160", "--bytes-at", "64", "--quiet",
                            "--lookahead", str(tmp_path / "la-1")]) == 0
    rows = {r["policy"]: r for r in json.loads((out / "eval-cache.json").read_text())["results"]}
    for name in ("la50", "h2o50"):
        assert rows[name]["prompt_kept"] == pytest.approx(0.5, abs=0.05)
        assert rows[name]["scored_tokens"] == 2 * 2 * 31 and set(rows[name]["select_ms"]) == {"@64"}
        assert set(rows[name]["accuracy"]) == {"passkey@96", "multifact@160"}
    # the paged engine serves lookahead: one kept set per layer and kv head, as many rows as h2o's one set
    assert rows["la50"]["engine_bytes_per_token"] == rows["h2o50"]["engine_bytes_per_token"]
    assert rows["la50"]["kv_bytes_per_token"] == rows["h2o50"]["kv_bytes_per_token"]
    # another module's results are not reused: its id (directory name) is part of the cache key
    la = PolicySpec(eviction=EvictionSpec("lookahead", budget_ratio=0.5, window_tokens=4, sink_tokens=2,
                                          pooling_kernel=3))
    assert eq.ResultCache(out / "eval-cache.jsonl", scorer_id="la-2").get("ppl/bible/64/0", la) is None
    assert eq.ResultCache(out / "eval-cache.jsonl", scorer_id="la-1").get("ppl/bible/64/0", la) is not None
