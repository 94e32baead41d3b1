"""Rebuild an HF `tokenizer.json` (+ tokenizer/generation config) from GGUF `tokenizer.ggml.*` metadata.

Supports byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM,
StarCoder, Llama 3, Qwen 2 pre-tokenizers) and SentencePiece BPE vocabularies with byte
fallback (`"llama"`: Llama 2, Mistral, TinyLlama), rebuilt the way HF's "legacy" Llama
tokenizer.json is: a space prefix per text segment, merges ranked by piece score.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts llama.cpp treats as end-of-generation when they are special tokens of the vocab.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                     "<|end_of_text|>", "<EOT>")

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre values that split digits one by one, then apply the GPT-2 regex
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):
        return gpt2
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise NotImplementedError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: gpt2, llama3/llama-bpe, qwen2, "
            f"{', '.join(_DIGITS_THEN_GPT2)}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _byte_level_bpe(tokens: list[str], meta: dict[str, Any]) -> Tokenizer:
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # Llama 3 (as in llama.cpp and its HF tokenizer.json): a word already in the vocab is one token
    ignore_merges = pre in ("llama3", "llama-bpe")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: dict[str, Any]) -> Tokenizer:
    """SentencePiece BPE: merge the adjacent pair whose merged piece scores highest; bytes as <0xXX>."""
    if "tokenizer.ggml.scores" not in meta:
        raise ValueError("a SentencePiece ('llama') GGUF vocabulary needs tokenizer.ggml.scores")
    scores = [float(x) for x in meta["tokenizer.ggml.scores"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    mergeable = {t for t, ty in zip(tokens, types, strict=True) if ty in (NORMAL, USER_DEFINED)}
    ranked = []  # (-score of merged piece, left id, right id, left, right)
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[vocab[piece]], vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "\u2581")]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))  # llama.cpp: after BOS and after every special token
    tok.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)
    return tok


def _opt_id(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


def build_tokenizer_files(meta: dict[str, Any], context_length: int
                          ) -> tuple[Tokenizer, dict[str, Any], dict[str, Any]]:
    """(tokenizer.json object, tokenizer_config.json dict, generation_config.json dict) from GGUF metadata."""
    model_type = meta.get("tokenizer.ggml.model")
    if model_type not in ("gpt2", "llama"):
        raise NotImplementedError(f"GGUF tokenizer model {model_type!r} is not supported "
                                  "(byte-level BPE 'gpt2' and SentencePiece BPE 'llama' are)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    tok = _byte_level_bpe(tokens, meta) if model_type == "gpt2" else _sentencepiece_bpe(tokens, types, meta)
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types, strict=True) if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    bos_id, eos_id = _opt_id(meta, "bos_token_id"), _opt_id(meta, "eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    if add_bos:
        assert bos_id is not None
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A {tokens[bos_id]} $B",
            special_tokens=[(tokens[bos_id], bos_id)])

    def name(token_id: int | None) -> str | None:
        return None if token_id is None else tokens[token_id]

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(bos_id), "eos_token": name(eos_id),
        "unk_token": name(_opt_id(meta, "unknown_token_id")),
        "pad_token": name(_opt_id(meta, "padding_token_id")),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if meta.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = str(meta["tokenizer.chat_template"])

    # End of generation: the declared eos/eot/eom plus llama.cpp's end-of-turn heuristic,
    # e.g. a ChatML model whose GGUF names a different eos still stops at <|im_end|>.
    eos_ids = [i for i in (eos_id, _opt_id(meta, "eot_token_id"), _opt_id(meta, "eom_token_id")) if i is not None]
    eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == CONTROL and t in END_OF_TURN_TEXTS]
    generation_config = {"bos_token_id": bos_id, "eos_token_id": list(dict.fromkeys(eos_ids))}
    return tok, tokenizer_config, generation_config
