"""Tokenizer: round trips, BOS handling, chat templates and streaming detokenization vs `transformers`."""

from __future__ import annotations

import json

import pytest
from kvfleet.dataplane.model.tokenizer import TemplateError, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "café naïve Straße 東京 你好世界 🙂🚀✨ 👩‍👩‍👧",
    "def main(argv): return 0  # code {\"k\": [1, 2]}",
    "words never seen in training: xylophone zebra quux",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_same_ids_as_transformers(tok, hf_tok, text) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id  # tiny model: add_bos_token = true
    assert tok.decode(ids) == text
    assert ids == hf_tok(text)["input_ids"]
    assert tok.encode(text, add_bos=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_eos(tok) -> None:
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == 0
    assert set(tok.eos_token_ids) == {1, 3}  # generation_config: end_of_text and im_end
    assert tok.vocab_size <= 384


def test_add_bos_follows_the_post_processor_without_a_flag(tiny_model_dir, tmp_path) -> None:
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).encode("hi")[0] == 0  # the template prepends BOS
    config["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).encode("hi")[0] != 0


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, chat, add_generation_prompt) -> None:
    ours = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert ours.startswith("<|begin_of_text|><|im_start|>")
    ids = tok.encode_chat(chat, add_generation_prompt=add_generation_prompt)
    hf_ids = hf_tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert ids == list(hf_ids)
    assert ids.count(tok.bos_token_id) == 1


def test_chat_template_raise_exception(tok) -> None:
    with pytest.raises(TemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize("text", TEXTS[:4])
def test_incremental_detokenizer_never_emits_partial_characters(tok, text) -> None:
    prompt = tok.encode("Prompt: ")
    ids = tok.encode(text, add_bos=False)
    detok = tok.detokenizer(prompt)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # byte-level BPE splits multi-byte characters across tokens: some pushes must emit ""
    if any(ord(c) > 127 for c in text):
        assert len(ids) > len(text.encode("utf-8")) // 4 and "" in deltas[:-1]


def test_incremental_detokenizer_skips_special_tokens(tok) -> None:
    detok = tok.detokenizer()
    ids = tok.encode("ok", add_bos=False) + [tok.token_to_id("<|im_end|>")]
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "ok"


def test_incremental_detokenizer_keeps_leading_spaces_with_sentencepiece_decoders(tmp_path) -> None:
    """Metaspace (Llama 2 / Mistral style) decoders drop a leading space at the start of a decode;
    the streamed text must still equal decode(prompt + generated) minus decode(prompt)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    raw.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(tmp_path)
    prompt = tok.encode("hello", add_bos=False)
    generated = tok.encode("hello world the fox", add_bos=False)[1:]  # starts with "▁world"
    detok = tok.detokenizer(prompt)
    streamed = "".join(detok.push(i) for i in generated) + detok.flush()
    assert streamed == " world the fox"
    assert streamed == tok.decode(prompt + generated)[len(tok.decode(prompt)):]
