"""`kvfleet profile-sharing` on tiny random siblings: a valid, deterministic SharingProfile whose curve and
plan follow the rules, measured on the weights it names; plus the plan-building rules on their own."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from kvfleet.dataplane.kvsharing import ProfileMismatch, ProfilePoint, SharingProfile, layer_groups
from kvfleet.dataplane.model.loader import safetensors_files
from kvfleet.dataplane.model.lora import CONFIG_FILE, WEIGHTS_FILE, weights_identity
from kvfleet.dataplane.model.tiny import write_perturbed_copy, write_random_lora, write_tiny_llama

from kvfleet.cli import main as kvfleet_main
from kvfleet.tools.profile_sharing import curve_plans, plan_layers, window_starts

LAYERS = 8
TEXT = "The quick brown fox jumps over the lazy dog. Prefill reads the prompt, decode writes 0 1 2 3 42.\n"
SMALL = ["--prompt-tokens", "24", "--continuation-tokens", "6", "--max-prompts", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    base = write_tiny_llama(root / "base", seed=0, num_hidden_layers=LAYERS)
    cal = root / "cal.txt"
    cal.write_text(TEXT * 16)
    return {"root": root, "base": base, "cal": cal,
            "ft-a": write_perturbed_copy(root / "ft-a", base, seed=1, scale=0.1),
            "ft-b": write_perturbed_copy(root / "ft-b", base, seed=2, scale=0.1),
            "late": write_perturbed_copy(root / "late", base, seed=3, scale=0.3, layers=(5, 6, 7)),
            "lora": write_random_lora(root / "lora", base, rank=4, seed=4, std=0.2)}


def run(tiny, src: str, dst: str, out: str, *more: str) -> SharingProfile:
    argv = ["profile-sharing", "--from", str(tiny[src]), "--to", str(tiny[dst]), "--base", str(tiny["base"]),
            "--from-variant", src, "--to-variant", dst, "--family", "tiny", "--calibration", str(tiny["cal"]),
            "--out", str(tiny["root"] / out), *SMALL, *more]
    assert kvfleet_main(argv) == 0
    return SharingProfile.from_json((tiny["root"] / out).read_text())


@pytest.fixture(scope="module")
def full_pair(tiny):
    return run(tiny, "ft-a", "ft-b", "ab.json")


def test_the_profile_is_valid_and_names_what_it_measured(tiny, full_pair, capsys) -> None:
    prof = full_pair
    assert SharingProfile.from_json(prof.to_json()) == prof
    assert (prof.from_variant, prof.to_variant, prof.family, prof.num_layers) == ("ft-a", "ft-b", "tiny", LAYERS)
    assert prof.from_weights == weights_identity(*safetensors_files(tiny["ft-a"]))
    assert prof.to_weights == weights_identity(*safetensors_files(tiny["ft-b"]))
    assert prof.calibration_sha256 == hashlib.sha256(tiny["cal"].read_bytes()).hexdigest()
    assert prof.calibration_tokens == 3 * (24 + 6)
    assert len(prof.layer_scores) == LAYERS and all(s >= 0 for s in prof.layer_scores)
    assert max(prof.layer_scores) > 0  # the siblings differ somewhere
    assert json.loads((tiny["root"] / "ab.json").read_text())["ranking"] == prof.ranking()
    assert prof.extra["settings"]["promptTokens"] == 24 and prof.extra["seconds"] >= 0


def test_running_twice_gives_the_same_ranking_and_curve(tiny, full_pair) -> None:
    again = run(tiny, "ft-a", "ft-b", "ab-again.json")
    assert again.layer_scores == full_pair.layer_scores
    assert again.ranking() == full_pair.ranking()
    assert again.curve == full_pair.curve


def test_the_curve_follows_the_plan_rules(full_pair) -> None:
    prof = full_pair
    sizes = [len(p.layers) for p in prof.curve]
    assert sizes[0] == 0 and sizes[-1] == LAYERS  # reuse everything ... recompute everything
    assert len({p.layers for p in prof.curve}) == len(prof.curve)  # each plan measured once
    for point in prof.curve[:-1]:
        assert len(layer_groups(point.layers)) <= 3 and len(point.layers) <= math.ceil(0.25 * LAYERS) + 2
    top = set(prof.ranking()[:1])
    assert top <= set(prof.curve[1].layers)  # n = 1 recomputes the worst layer to reuse
    everything = prof.curve[-1]
    assert abs(everything.ppl_increase) < 1e-6 and everything.token_agreement == 1.0
    assert abs(everything.kl_divergence) < 1e-6 and all(p.kl_divergence >= -1e-9 for p in prof.curve)
    assert prof.curve[0].kl_divergence > 0  # reusing all of A's KV changes B's predictions
    per = prof.extra["perWindow"]  # the per-window record adds up to the curve
    assert len(per["start"]) == 3 and len(per["nllIncrease"]) == len(prof.curve)
    for point, nll, agree in zip(prof.curve, per["nllIncrease"], per["tokenAgreement"], strict=True):
        assert math.isclose(math.exp(sum(nll) / 3) - 1, point.ppl_increase, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(sum(agree) / 3, point.token_agreement)


@pytest.mark.parametrize("fraction", [0.125, 0.25, 0.5])
def test_the_plan_respects_max_fraction(full_pair, fraction) -> None:
    plan = full_pair.plan(fraction)
    within = [p for p in full_pair.curve if len(p.layers) <= fraction * LAYERS]
    meeting = [p for p in within if abs(p.ppl_increase) <= full_pair.quality_budget]  # a fall counts too
    if meeting:
        assert plan in meeting and len(plan.layers) == min(len(p.layers) for p in meeting)
    else:
        assert plan is None
        assert full_pair.closest(fraction) == min(within, key=lambda p: (abs(p.ppl_increase), len(p.layers)))


def test_a_perplexity_fall_does_not_pass_the_budget() -> None:
    prof = SharingProfile("a", "b", "f", num_layers=4, curve=(
        ProfilePoint((), -0.05, 0.8), ProfilePoint((0,), 0.02, 0.9), ProfilePoint((0, 1), 0.004, 0.99)))
    assert prof.plan(0.5).layers == (0, 1)
    assert prof.plan(0.25) is None and prof.closest(0.25).layers == (0,)


def test_layers_where_the_siblings_agree_score_zero(tiny) -> None:
    """'late' differs from the base only in layers 5-7: reusing the base's K/V below is free."""
    prof = run(tiny, "base", "late", "late.json", "--max-fraction", "0.5")
    assert prof.from_weights == "" and prof.to_weights != ""
    assert all(s == 0 for s in prof.layer_scores[:5]) and prof.layer_scores[5] > 0
    assert set(prof.ranking()[:3]) == {5, 6, 7}
    best = next(p for p in prof.curve if set(p.layers) == {5, 6, 7})  # from the base's hidden entering 5
    assert abs(best.ppl_increase) < 1e-5 and best.token_agreement == 1.0


def test_a_lora_variant_is_profiled_under_its_adapter_identity(tiny) -> None:
    prof = run(tiny, "base", "lora", "lora.json")
    lora = tiny["lora"]
    assert prof.to_weights == weights_identity(lora / CONFIG_FILE, lora / WEIGHTS_FILE)
    assert max(prof.layer_scores) > 0 and prof.curve[-1].token_agreement == 1.0


def test_a_profile_refuses_the_wrong_pair_and_foreign_json(full_pair) -> None:
    full_pair.check_pair("ft-a", "ft-b", "tiny")
    for args in (("ft-b", "ft-a", "tiny"), ("ft-a", "lora", "tiny"), ("ft-a", "ft-b", "smollm2-135m")):
        with pytest.raises(ProfileMismatch):
            full_pair.check_pair(*args)
    good = full_pair.to_dict()
    bad = [dict(good, kind="ConfigMap"), dict(good, version=2), {k: v for k, v in good.items() if k != "family"},
           dict(good, numLayers=3), dict(good, layerScores="high"), dict(good, **{"from": "ft-a"})]
    for data in bad:
        with pytest.raises(ProfileMismatch):
            SharingProfile.from_json(json.dumps(data))
    for text in ("not json", "[1, 2]", "{}"):
        with pytest.raises(ProfileMismatch):
            SharingProfile.from_json(text)


def test_windows_are_consecutive_and_evenly_spread() -> None:
    assert window_starts(100, 30, 8) == [0, 30, 60]
    assert window_starts(100, 10, 4) == [0, 20, 50, 70]
    with pytest.raises(SystemExit):
        window_starts(100, 101, 1)


def test_plans_fill_the_smallest_gaps_then_drop_the_weakest_group() -> None:
    scores = [5.0, 0, 4.0, 0, 0, 3.0, 0, 0, 0, 2.0, 0, 1.0]
    ranking = sorted(range(12), key=lambda i: (-scores[i], i))
    assert plan_layers(ranking, scores, 3, 3) == (0, 2, 5)  # three groups already
    assert plan_layers(ranking, scores, 4, 5) == (0, 1, 2, 5, 9)  # the 1-layer gap is the smallest
    # n = 5: {0, 2, 5, 9, 11}: fill 0-2 and 9-11 (gaps of 1) -> 7 layers, within 5 + 2
    assert plan_layers(ranking, scores, 5, 7) == (0, 1, 2, 5, 9, 10, 11)
    # only 6 allowed: after 0-2 the next gap does not fit, so the weakest group (11, score 1) goes
    assert plan_layers(ranking, scores, 5, 6) == (0, 1, 2, 5, 9)
    plans = curve_plans(scores, 0.25)
    assert [n for n, _ in plans] == [0, 1, 2, 3, 12] and plans[-1][1] == tuple(range(12))
    assert all(len(p) <= 3 for n, p in plans if n <= 3)  # within floor(0.25 * 12) while n is


def test_a_profile_without_kl_still_reads(full_pair) -> None:
    data = full_pair.to_dict()
    for point in data["curve"]:
        del point["klDivergence"]
    old = SharingProfile.from_json(json.dumps(data))
    assert all(p.kl_divergence is None for p in old.curve) and getattr(old.plan(), "layers", None) == getattr(full_pair.plan(), "layers", None)
    assert "klDivergence" not in old.to_dict()["curve"][0]
