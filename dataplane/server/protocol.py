"""Request models of the OpenAI-compatible API (pydantic, OpenAI's field names).

Validation is strict about types (a string where a number belongs is a 400,
as with OpenAI), accepts the fields the `openai` SDK sends, and rejects the
ones this server cannot honour (`suffix`, echo with logprobs, images):
`unsupported()` names them, so the client gets a message rather than silence.

Extensions (as in vLLM): `top_k`, `ignore_eos`, `repetition_penalty`, `min_tokens`,
`kvfleet_slo_class`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from kvfleet.dataplane.engine.api import SEED_MAX, SEED_MIN
from kvfleet.dataplane.server.tools import NamedToolChoice, Tool, ToolCallMessage, ToolChoice
from kvfleet.dataplane.server.tools import mode as tools_mode
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128  # prompts x n (or best_of) in one request


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always honoured: constrained output parses against the schema either way


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema the output must satisfy (any JSON object for json_object), as JSON text."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema" and self.json_schema is not None:
            return json.dumps(self.json_schema.schema_ if self.json_schema.schema_ is not None else {})
        return None


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # extension; -1 or 0 = disabled
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None  # a signed 64-bit integer
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None  # extension (HF/vLLM)
    min_tokens: Annotated[int, Field(ge=0)] = 0  # extension (vLLM): no eos / stop token before this many
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    ignore_eos: bool = False  # extension: generate exactly max_tokens tokens (benchmarks)
    kvfleet_slo_class: str | None = None  # extension: the SLOClass (the header wins when both are set)
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(param, reason) for a well-formed value this server cannot honour, else None."""
        return None

    def logit_bias_pairs(self, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias); ValueError naming the bad key."""
        out = []
        for key, bias in (self.logit_bias or {}).items():
            try:
                tok = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise ValueError(f"logit_bias token id {tok} is out of range [0, {vocab_size})")
            out.append((tok, float(bias)))
        return tuple(out)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt`: a string, a token-id list, or a list (a batch) of either."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    def num_sequences(self) -> int:
        """Sequences to generate per prompt: best_of when given (the n best are returned), else n."""
        return max(self.n, self.best_of or 1)

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo and self.logprobs is not None:
            return "echo", "echo together with logprobs (prompt logprobs) is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of < self.n:
            return "best_of", "best_of must be at least n"
        if self.best_of is not None and self.best_of > 1 and self.stream:
            return "best_of", "best_of > 1 cannot be streamed"
        return super().unsupported()

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts of the batch (one for a single prompt); ValueError for empty ones."""
        p = self.prompt
        prompts = list(p) if isinstance(p, list) and p and isinstance(p[0], str | list) else [p]
        if isinstance(p, list) and not p:
            raise ValueError("prompt must not be empty")
        if any(isinstance(x, list) and not x for x in prompts):
            raise ValueError("a token-id prompt must not be empty")
        if len(prompts) * max(self.n, self.best_of or 1) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices (prompts x n) per request")
        return prompts  # type: ignore[return-value]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (tool-call arguments as objects, as HF templates expect)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args: Any = json.loads(c.function.arguments)
                except json.JSONDecodeError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": args}})
            out["tool_calls"] = calls
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # False: at most one call is returned

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs=true"
        return super().unsupported()

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for a chat template (content parts joined)."""
        return [m.for_template() for m in self.messages]

    def tool_error(self) -> tuple[str, str] | None:
        """(param, reason) when tools / tool_choice do not fit together."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                return "tool_choice", "tool_choice needs tools"
            return None
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            return "tools", "function names must be unique"
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return "tool_choice", f"no tool named '{choice.function.name}'"
        if tools_mode(choice) in ("required", "named") and self.response_format is not None \
                and self.response_format.type != "text":
            return "response_format", "a required or named tool_choice already fixes the output format"
        return None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, object]:
    """The OpenAI `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
