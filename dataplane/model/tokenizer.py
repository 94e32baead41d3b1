"""`Tokenizer`: encode/decode, streaming detokenization, EOS ids and chat templates of an HF model dir.

Wraps `tokenizers.Tokenizer` (tokenizer.json). Whether a BOS is prepended is decided
here, not by tokenizer.json's post-processor: `tokenizer_config.json`'s `add_bos_token`
wins, otherwise we follow what the post-processor would do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


class TemplateError(ValueError):
    """The chat template called raise_exception, or there is no template."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) render their body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

    def _passthrough(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile an HF chat template in a sandbox, with the globals HF templates expect."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas for streaming.

    Decodes a short window of recent tokens twice (with and without the newest ones)
    and emits the difference, holding text back while it ends in U+FFFD (a multi-byte
    character split across tokens). Concatenated deltas + `flush()` == full decode.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # Start the window a few prompt tokens back so decoders that strip a leading
        # space (SentencePiece) see context; those tokens are never emitted.
        self._ids: list[int] = list(prompt_ids[-4:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this index were already emitted

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the new text it completes (maybe "")."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truly invalid byte sequence at the end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]


class Tokenizer:
    """The tokenizer of an HF-format model directory (see `from_dir`)."""

    def __init__(self, tok: tokenizers.Tokenizer, tokenizer_config: dict[str, Any],
                 eos_token_ids: Iterable[int] = (), chat_template: str | None = None,
                 bos_token_id: int | None = None) -> None:
        self._tok = tok
        self.config = tokenizer_config
        self.bos_token = _token_str(tokenizer_config.get("bos_token"))
        self.eos_token = _token_str(tokenizer_config.get("eos_token"))
        self.pad_token = _token_str(tokenizer_config.get("pad_token"))
        self.unk_token = _token_str(tokenizer_config.get("unk_token"))
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else bos_token_id
        if self.bos_token is None and self.bos_token_id is not None:
            self.bos_token = tok.id_to_token(self.bos_token_id)
        eos = list(eos_token_ids)
        if self.eos_token and (eos_id := self.token_to_id(self.eos_token)) is not None:
            eos.append(eos_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))  # ordered, unique
        self.add_bos = self._resolve_add_bos()
        self.chat_template = chat_template
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, generation_config.json, config.json."""
        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d / 'tokenizer.json'} not found (only fast tokenizers are supported)")
        tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        tok_config = _read_json(d / "tokenizer_config.json")
        gen_config = _read_json(d / "generation_config.json")
        model_config = _read_json(d / "config.json")
        eos = _ids(gen_config.get("eos_token_id")) + _ids(model_config.get("eos_token_id"))
        bos_id = gen_config.get("bos_token_id", model_config.get("bos_token_id"))
        template = tok_config.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            by_name = {t["name"]: t["template"] for t in template}
            template = by_name.get("default", next(iter(by_name.values()), None))
        return cls(tok, tok_config, eos, template, bos_id)

    def _resolve_add_bos(self) -> bool:
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"]) and self.bos_token_id is not None
        if self.bos_token_id is None:
            return False
        probe = self._tok.encode("a", add_special_tokens=True).ids
        return bool(probe) and probe[0] == self.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; add_bos None = the tokenizer's default (`self.add_bos`)."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
                    ) -> IncrementalDetokenizer:
        """A streaming detokenizer for one sequence whose prompt was `prompt_ids`."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's Jinja chat template."""
        if not self.chat_template:
            raise TemplateError("this model has no chat template (tokenizer_config.json 'chat_template')")
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or "", "unk_token": self.unk_token or "", **kwargs}
        return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **variables)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Prompt ids of a chat: the rendered template, encoded without adding another BOS."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_bos=False)
