"""Request models of the OpenAI-compatible API (pydantic, OpenAI's field names).

Validation is strict about types (a string where a number belongs is a 400,
as with OpenAI), accepts the fields the `openai` SDK sends, and rejects the
ones this server cannot honour (n > 1, echo, non-zero penalties, images):
`unsupported()` names them, so the client gets a message rather than silence.

Extensions (as in vLLM): `top_k`, `ignore_eos`, `kvfleet_slo_class`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from kvfleet.dataplane.engine.api import SEED_MAX, SEED_MIN
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # extension; -1 or 0 = disabled
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None  # a signed 64-bit integer
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # extension: generate exactly max_tokens tokens (benchmarks)
    kvfleet_slo_class: str | None = None  # extension: the SLOClass (the header wins when both are set)

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
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, "only 0 is supported"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt`: a string, a token-id list, or a one-element list of either."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        return super().unsupported()

    def single_prompt(self) -> str | list[int]:
        """The one prompt, unwrapped from a one-element batch; ValueError for batches or empty prompts."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ValueError("prompt must not be empty")
        return p  # type: ignore[return-value]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs=true"
        return super().unsupported()

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as plain dicts for a chat template (content parts joined)."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, object]:
    """The OpenAI `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
