"""`kvfleet eval-cache` end to end on a tiny random model (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvfleet.dataplane.model.tiny import write_tiny_llama

from kvfleet.cli import main as cli_main
from kvfleet.tools import eval_cache

POLICIES = """\
apiVersion: kvfleet.io/v1alpha1
kind: CachePolicy
metadata: {name: int8-kivi}
spec:
  quantization: {dtype: int8, groupSize: 8, residualTokens: 8, sinkTokens: 2}
---
apiVersion: kvfleet.io/v1alpha1
kind: CachePolicy
metadata: {name: int4-snapkv}
spec:
  quantization: {dtype: int4, groupSize: 8}
  eviction: {policy: snapkv, budgetRatio: 0.5, windowTokens: 8, sinkTokens: 2}
---
apiVersion: kvfleet.io/v1alpha1
kind: CachePolicy
metadata: {name: int8-pre-rope}
spec:
  quantization: {dtype: int8, groupSize: 8, keysPreRope: true}
"""

ARGS = ["--stepwise", "--lengths", "48,96", "--passkey-samples", "1", "--ppl-context", "48", "--ppl-score", "6",
        "--ppl-samples", "1", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_eval_cache_end_to_end(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = tmp_path / "policies.yaml"
    pol.write_text(POLICIES)
    fp16_json = tmp_path / "fp16.json"
    fp16_json.write_text(json.dumps({"quantization": {"dtype": "fp16"}}))
    out = tmp_path / "out"
    rc = cli_main(["eval-cache", "--model", str(tiny), "--policy", str(pol), str(fp16_json),
                   "--out", str(out), *ARGS])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| policy |" in printed and "int4-snapkv" in printed
    report = json.loads((out / "eval-cache.json").read_text())
    rows = {r["policy"]: r for r in report["results"]}
    assert list(rows) == ["baseline", "int8-kivi", "int4-snapkv", "int8-pre-rope", "fp16"]
    # keys quantized before RoPE and re-rotated on read stay close to the baseline (int8)
    assert abs(rows["int8-pre-rope"]["perplexity_delta_pct"]) < 1.0
    base = rows["baseline"]
    full = 2 * 2 * 2 * 16 * 4  # K+V, 2 layers, 2 kv heads, head_dim 16, float32
    assert base["kv_bytes_per_token"] == full and base["perplexity_delta_pct"] == 0.0
    assert rows["fp16"]["kv_bytes_per_token"] == full / 2
    assert rows["int8-kivi"]["kv_bytes_per_token"] < full
    assert rows["int4-snapkv"]["kv_bytes_per_token"] < rows["int8-kivi"]["kv_bytes_per_token"]
    for r in rows.values():
        assert set(r["passkey"]) == {"48", "96"} and r["decode_tok_s"] > 0 and r["perplexity"] > 1
    assert report["kv_bytes_per_token_16bit"] == full / 2
    assert "| int8-kivi |" in (out / "eval-cache.md").read_text()


def test_eval_cache_rejects_a_bad_policy(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  quantization: {dtype: int4, keyGranularity: per-token, groupSize: 12}\n")
    assert eval_cache.main(["--model", str(tiny), "--policy", str(bad), *ARGS]) == 2
    assert "must divide head_dim" in capsys.readouterr().err


def test_passkey_prompt_length_and_needle(tiny: Path) -> None:
    from kvfleet.dataplane.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny)
    ids = eval_cache.passkey_prompt(tok, 200, 0.5, "12345")
    assert 150 <= len(ids) <= 230
    assert "The pass key is 12345" in tok.decode(ids)


def test_bible_text_is_available() -> None:
    text = eval_cache.bible_text(max_chars=5000)
    assert text.startswith("Now it came to pass in the days when the judges ruled") and len(text) > 4000
