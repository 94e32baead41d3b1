"""Structured output: a JSON schema turned into a per-step token mask by llguidance.

`SamplingParams.json_schema` (JSON text) is compiled once per distinct schema into an
llguidance grammar; each constrained sequence owns an `LLMatcher`. Per step, the masks
of all constrained rows are filled in one call into an int32 bitmask (the Rust side
works on the rows in parallel threads and drops the GIL), then applied to the batch's
logits by `logits_process.apply_token_bitmask` in one tensor op: unconstrained rows are
untouched and no row waits on another. When the grammar is complete only the model's
eos is allowed, so a constrained output always parses (unless max_tokens cuts it).

JSON is compact (no whitespace between tokens): a small model cannot ramble in
whitespace, and every parser reads it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

# compact separators, no free whitespace (see the module docstring)
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


def _llg() -> Any:
    try:
        import llguidance  # noqa: PLC0415 - imported when the first constrained request comes
        import llguidance.torch  # noqa: PLC0415, F401
    except ImportError as e:  # a ValueError refuses the request; an ImportError would stop the engine loop
        raise ValueError("structured output needs the llguidance package (pip install 'kvfleet[engine]')") from e
    return llguidance


class StructuredOutputs:
    """Grammar matchers of the running constrained sequences, keyed by sequence id."""

    def __init__(self, tokenizer_json: str | Path, vocab_size: int, eos_token_ids: Collection[int]) -> None:
        self.tokenizer_json = Path(tokenizer_json)
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._grammars: dict[str, str] = {}
        self._matchers: dict[str, Any] = {}

    @cached_property
    def tokenizer(self) -> Any:
        llg = _llg()
        if not self.tokenizer_json.is_file():
            raise ValueError(f"structured output needs the model's tokenizer.json ({self.tokenizer_json} is missing)")
        try:
            return llg.LLTokenizer(self.tokenizer_json.read_text(), n_vocab=self.vocab_size,
                                   eos_token=self.eos_token_ids or None)
        except Exception as e:  # noqa: BLE001 - refuse the request, keep the engine loop alive
            raise ValueError(f"llguidance cannot read this model's tokenizer: {e}") from e

    @cached_property
    def executor(self) -> Any:
        return _llg().LLExecutor()

    def grammar(self, schema: str) -> str:
        """The llguidance grammar of a JSON schema (cached); ValueError when it cannot be compiled."""
        g = self._grammars.get(schema)
        if g is None:
            llg = _llg()
            try:
                g = llg.LLMatcher.grammar_from_json_schema(json.loads(schema), defaults=JSON_OPTIONS)
            except (ValueError, TypeError) as e:
                raise ValueError(f"invalid JSON schema: {e}") from e
            is_error, msgs = llg.LLMatcher.validate_grammar_with_warnings(g, self.tokenizer)
            if is_error:
                raise ValueError(f"unsupported JSON schema: {'; '.join(msgs)}")
            self._grammars[schema] = g
        return g

    def matcher(self, seq_id: str, schema: str) -> Any:
        m = self._matchers.get(seq_id)
        if m is None:
            m = self._matchers[seq_id] = _llg().LLMatcher(self.tokenizer, self.grammar(schema), log_level=0)
        return m

    def masks(self, rows: Sequence[tuple[str, str]]) -> torch.Tensor:
        """(seq id, schema) per constrained row -> int32 bitmask [len(rows), ceil(V / 32)] on the CPU."""
        llg = _llg()
        bitmask = torch.full((len(rows), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        matchers = [(self.matcher(sid, schema), i) for i, (sid, schema) in enumerate(rows)]
        llg.torch.fill_next_token_bitmask_par(self.executor, matchers, bitmask)
        return bitmask

    def advance(self, seq_id: str, token_id: int) -> None:
        """The row's sampled token (always one the mask allowed) moves its matcher on."""
        m = self._matchers.get(seq_id)
        if m is not None and not m.is_stopped():
            m.consume_token(token_id)

    def release(self, seq_id: str) -> None:
        self._matchers.pop(seq_id, None)
