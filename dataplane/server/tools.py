"""Tools (function calling) in chat completions: request types, constraint, parsing, streaming.

The tools are rendered by the model's own chat template (its `tools` variable); a
template that never mentions `tools` cannot show them to the model, so such a request
is refused. What the model writes back is read in the formats templates teach:

- Hermes / Qwen 2.5: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (any number,
  after optional text);
- Llama 3.x: the whole reply is one `{"name": ..., "parameters": {...}}` object.

`tool_choice` "auto" leaves the model free and parses what it wrote (a malformed call
stays text). "required" and a named function constrain the output with a JSON schema
(engine/structured.py), so the arguments always parse against the function's schema:
named -> the arguments object itself; required -> `[{"name", "parameters"}, ...]` (at most
MAX_CALLS calls, one when `parallel_tool_calls` is false).
"none" shows the tools to the model but never parses a call.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MARKER, END_MARKER = "<tool_call>", "</tool_call>"
MAX_CALLS = 8  # a constrained "required" reply holds at most this many calls (1 without parallel_tool_calls)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class FunctionDef(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # constrained calls always follow the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCallMessage(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


def parameters_schema(f: FunctionDef) -> dict[str, Any]:
    return f.parameters if f.parameters is not None else {"type": "object", "properties": {}}


def mode(choice: ToolChoice | None) -> str:
    """'none', 'auto', 'required' or 'named'."""
    return "named" if isinstance(choice, NamedToolChoice) else (choice or "auto")


def constraint(tools: list[Tool], choice: ToolChoice | None, parallel: bool = True) -> str | None:
    """The JSON schema a required or named tool choice constrains the output to (None: free)."""
    if isinstance(choice, NamedToolChoice):
        f = next(t.function for t in tools if t.function.name == choice.function.name)
        return json.dumps(parameters_schema(f))
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                    "parameters": parameters_schema(t.function)},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        return json.dumps({"type": "array", "minItems": 1, "maxItems": MAX_CALLS if parallel else 1,
                           "items": {"anyOf": calls}})
    return None


def new_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _as_call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return new_call(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def parse(text: str, tools: list[Tool], choice: ToolChoice | None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a reply; calls that do not parse leave the text as content."""
    m = mode(choice)
    if m == "none" or not tools:
        return text, []
    if isinstance(choice, NamedToolChoice):
        return None, [new_call(choice.function.name, text)]
    names = {t.function.name for t in tools}
    if m == "required":
        try:
            calls = [_as_call(c, names) for c in json.loads(text)]
        except (json.JSONDecodeError, TypeError):
            return text, []  # cut short by max_tokens
        return None, [c for c in calls if c is not None]
    if MARKER in text:
        found = []
        for body in _HERMES.findall(text):
            try:
                found.append(_as_call(json.loads(body), names))
            except json.JSONDecodeError:
                found.append(None)
        if found and all(c is not None for c in found):
            head = text[:text.index(MARKER)].strip()
            return head or None, found  # type: ignore[return-value]
        return text, []
    if text.lstrip().startswith("{"):
        try:
            call = _as_call(json.loads(text), names)
        except json.JSONDecodeError:
            call = None
        if call is not None:
            return None, [call]
    return text, []


class ToolStream:
    """One choice's streamed reply as OpenAI deltas: content as it comes, tool calls as the SDK expects
    them (`delta.tool_calls[i]` with id, type and name first, then pieces of `function.arguments`)."""

    def __init__(self, tools: list[Tool], choice: ToolChoice | None, max_calls: int | None = None) -> None:
        self.tools, self.choice, self.mode = tools, choice, mode(choice)
        self.max_calls = max_calls
        self.buf = ""
        self.sent = 0  # chars of buf already sent as content
        self.holding = False  # auto: a call may have started; keep the rest for the end
        self.call_id: str | None = None
        self.num_calls = 0
        self.role_sent = False  # the handler adds role "assistant" to the choice's first delta

    def push(self, text: str) -> list[dict[str, Any]]:
        """Deltas to send now for this piece of text."""
        self.buf += text
        if self.mode == "named":
            if not text and self.call_id is not None:
                return []
            fn: dict[str, Any] = {"arguments": text}
            call: dict[str, Any] = {"index": 0, "function": fn}
            if self.call_id is None:
                self.call_id = new_call("", "")["id"]
                self.num_calls = 1
                call |= {"id": self.call_id, "type": "function"}
                fn["name"] = self.choice.function.name  # type: ignore[union-attr]
            return [{"tool_calls": [call]}]
        if self.mode == "required" or self.holding:
            return []
        if self.mode == "auto" and self.tools:
            if self.sent == 0 and self.buf.lstrip().startswith("{"):
                self.holding = True
                return []
            at = self.buf.find(MARKER)
            if at >= 0:
                self.holding = True
                return self._content(at)
            return self._content(_safe_end(self.buf))
        return self._content(len(self.buf))

    def finish(self) -> tuple[list[dict[str, Any]], bool]:
        """Deltas at the end of the reply, and whether it made tool calls."""
        if self.mode == "named":
            return [], True
        if self.mode == "none" or not self.holding and self.mode != "required":
            return self._content(len(self.buf)), False
        content, calls = parse(self.buf, self.tools, self.choice)
        calls = calls[:self.max_calls]
        if not calls:
            return self._content(len(self.buf)), False
        out = self._content(self.buf.find(MARKER)) if MARKER in self.buf else []
        self.num_calls = len(calls)
        out += [{"tool_calls": [{"index": i} | c]} for i, c in enumerate(calls)]
        return out, True

    def _content(self, end: int) -> list[dict[str, Any]]:
        if end <= self.sent:
            return []
        text, self.sent = self.buf[self.sent:end], end
        return [{"content": text}]


def _safe_end(buf: str) -> int:
    """How much of buf can be released: all but a suffix that may be the start of the marker."""
    for k in range(min(len(MARKER) - 1, len(buf)), 0, -1):
        if MARKER.startswith(buf[-k:]):
            return len(buf) - k
    return len(buf)
