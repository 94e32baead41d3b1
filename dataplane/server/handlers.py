"""POST /v1/completions and /v1/chat/completions: validate, tokenize, generate, respond.

Both endpoints share one path: parse the body into a pydantic request, turn
it into prompt token ids and `SamplingParams`, run a `Generation` (one per
prompt of a batch, each with `n` choices), and either collect the pieces into
one JSON response or stream them as server-sent events (`data: {...}` lines,
one choice each, then `data: [DONE]`). Chat tools are rendered by the model's
template and parsed back into `tool_calls` by `tools.py`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from kvfleet.dataplane.engine.api import AsyncEngine, GenerationRequest, SamplingParams, TokenLogprob
from kvfleet.dataplane.server.choices import ChoiceResult, collect, merged
from kvfleet.dataplane.server.errors import APIError, from_validation_error, model_not_found
from kvfleet.dataplane.server.generation import Detokenizer, Generation, Piece
from kvfleet.dataplane.server.metrics import ServerMetrics
from kvfleet.dataplane.server.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields, usage
from kvfleet.dataplane.server.tools import ToolStream
from kvfleet.dataplane.server.tools import constraint as tool_constraint
from kvfleet.dataplane.server.tools import parse as parse_tool_calls
from kvfleet.dataplane.tracing import RequestTrace, SLOTarget, Telemetry
from pydantic import ValidationError

SLO_CLASS_HEADER = "x-kvfleet-slo-class"
log = logging.getLogger(__name__)


class ServerTokenizer(Protocol):
    """What the server needs from a tokenizer (`kvfleet.dataplane.model.tokenizer.Tokenizer` has it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kw: Any) -> list[int]: ...

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer: ...


@dataclass
class ServerState:
    """Everything the handlers share; built once by `build_app`."""

    engine: AsyncEngine
    tokenizer: ServerTokenizer
    served_model_names: list[str]
    metrics: ServerMetrics
    variant: str = ""
    slo_classes: frozenset[str] | None = None  # None: any name is passed on to the engine
    vocab_size: int | None = None
    variants: dict[str, str] | None = None  # served model name -> variant (a router of several); else `variant`
    parents: dict[str, str] | None = None  # served model name of a LoRA variant -> its base's (/v1/models)
    telemetry: Telemetry | None = None  # spans per request and unsampled SLO counts (kvfleet.dataplane.tracing)
    slo_targets: dict[str, SLOTarget] | None = None  # class name -> TTFT/TPOT targets (attained or not)
    default_slo_class: str | None = None
    draining: bool = False  # SIGTERM: new requests get 503 while in-flight ones finish (`app.drain`)
    in_flight: int = 0  # generation requests being answered (a router's engine has no local queue to ask)


async def read_json(request: web.Request, model: type[_SamplingFields]) -> Any:
    """The body as a validated request model, or an APIError naming what is wrong."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"The request body is not valid UTF-8 (byte {e.start}).", code="invalid_encoding") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(f"We could not parse the JSON body of your request: {e.msg} at line {e.lineno} "
                       f"column {e.colno}.", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from e


class OpenAIHandlers:
    """The two generation endpoints over one `ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionRequest = await read_json(request, CompletionRequest)
        self._check_common(body)
        try:
            prompts = body.prompt_list()
        except ValueError as e:
            raise APIError(str(e), param="prompt") from e
        encoded = [self._encode_text(p) if isinstance(p, str) else self._check_ids(p) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        seqs = body.num_sequences()
        # best_of ranks sequences by their summed logprob: ask for the chosen tokens' logprobs
        lp = body.logprobs if seqs == body.n else (body.logprobs or 0)
        gens = [self._start(request, body, rid if len(encoded) == 1 else f"{rid}-{i}", ids,
                            self._check_length(len(ids), body.max_tokens, "prompt"), lp, seqs)
                for i, ids in enumerate(encoded)]
        echo = [p if isinstance(p, str) else self.state.tokenizer.decode(p) for p in prompts] if body.echo else None
        n = body.n
        await self._admit(gens)  # may answer 429 before any byte is sent
        if body.stream:
            def chunk(g: int, piece: Piece, first: bool) -> list[dict[str, Any]]:
                text = (echo[g] if echo and first else "") + piece.text
                lp = self._completion_logprobs(piece.logprobs) if body.logprobs is not None else None
                return [{"index": g * n + piece.index, "text": text, "logprobs": lp,
                         "finish_reason": piece.finish_reason}]
            return await self._stream(request, rid, gens, body, chunk)
        results = await self._collect(gens, seqs)
        if seqs > n:
            results = [sorted(r, key=lambda c: -sum(lp.logprob for lp in c.logprobs))[:n] for r in results]
        choices = [{"index": g * n + i, "text": (echo[g] if echo else "") + r.text,
                    "logprobs": self._completion_logprobs(r.logprobs) if body.logprobs is not None else None,
                    "finish_reason": r.finish_reason}
                   for g, per_gen in enumerate(results) for i, r in enumerate(per_gen)]
        return web.json_response(self._envelope(rid, body, "text_completion", choices, gens))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
        self._check_common(body)
        bad = body.tool_error()
        if bad is not None:
            raise APIError(f"Invalid value for '{bad[0]}': {bad[1]}.", param=bad[0], code="invalid_value")
        tools, choice = body.tools or [], body.tool_choice
        if tools and "tools" not in (getattr(self.state.tokenizer, "chat_template", None) or ""):
            raise APIError("This model's chat template does not support tools (it never reads 'tools'), so the "
                           "model cannot see them; send the request without tools.", param="tools",
                           code="unsupported_value")
        kw = {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
        prompt_ids = self._encode_chat(body.chat_messages(), **kw)
        max_tokens = self._check_length(len(prompt_ids), body.requested_max_tokens(), "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = self._start(request, body, rid, prompt_ids, max_tokens, top,
                          json_schema=tool_constraint(tools, choice, body.parallel_tool_calls is not False)
                          if tools else None)
        max_calls = 1 if body.parallel_tool_calls is False else None
        await self._admit([gen])  # may answer 429 before any byte is sent
        if body.stream:
            streams = [ToolStream(tools, choice, max_calls) for _ in range(body.n)]
            return await self._stream(request, rid, [gen], body,
                                      lambda g, piece, first: self._chat_chunks(body, streams[piece.index], piece))
        results = (await self._collect([gen], body.n))[0]
        choices = []
        for i, r in enumerate(results):
            content, calls = parse_tool_calls(r.text, tools, choice)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls[:max_calls]
            # a reply cut by max_tokens says so, even when its (truncated) call was kept
            reason = "tool_calls" if calls and r.finish_reason != "length" else r.finish_reason
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": {"content": self._chat_logprobs(r.logprobs)} if body.logprobs else None})
        return web.json_response(self._envelope(rid, body, "chat.completion", choices, [gen]))

    def _chat_chunks(self, body: ChatCompletionRequest, ts: ToolStream, piece: Piece) -> list[dict[str, Any]]:
        """The chunks' choices for one piece: content deltas, tool-call deltas at the end."""
        deltas = ts.push(piece.text)
        reason = piece.finish_reason
        if reason is not None:
            extra, called = ts.finish()
            deltas += extra
            reason = "tool_calls" if called and reason != "length" else reason
        if not deltas and (reason is not None or piece.logprobs or not ts.tools):
            deltas = [{"content": ""} if not ts.tools else {}]
        out = []
        for k, d in enumerate(deltas):
            if not ts.role_sent:
                d = {"role": "assistant"} | ({"content": None} if "tool_calls" in d else {}) | d
                ts.role_sent = True
            lp = {"content": self._chat_logprobs(piece.logprobs)} if body.logprobs and k == 0 else None
            out.append({"index": piece.index, "delta": d, "logprobs": lp,
                        "finish_reason": reason if k == len(deltas) - 1 else None})
        return out

    # -- request -> engine ------------------------------------------------------

    def _check_common(self, body: _SamplingFields) -> None:
        bad = body.unsupported()
        if bad is not None:
            raise APIError(f"Unsupported value for '{bad[0]}': {bad[1]}.", param=bad[0], code="unsupported_value")
        if body.model not in self.state.served_model_names:
            raise model_not_found(body.model, self.state.served_model_names)

    def _encode_text(self, text: str) -> list[int]:
        ids = list(self.state.tokenizer.encode(text))
        if not ids:
            raise APIError("The prompt is empty after tokenization.", param="prompt")
        return ids

    def _encode_chat(self, messages: list[dict[str, Any]], **template_kw: Any) -> list[int]:
        try:
            ids = list(self.state.tokenizer.encode_chat(messages, add_generation_prompt=True, **template_kw))
        except Exception as e:  # noqa: BLE001 - a template may reject a message order; that is the client's
            raise APIError(f"The chat template rejected these messages: {e}", param="messages") from e
        if not ids:
            raise APIError("The chat prompt is empty after tokenization.", param="messages")
        return ids

    def _check_ids(self, ids: list[int]) -> list[int]:
        limit = self.state.vocab_size
        bad = [t for t in ids if t < 0 or (limit is not None and t >= limit)]
        if bad:
            raise APIError(f"Token id {bad[0]} is out of range [0, {limit}).", param="prompt", code="invalid_value")
        return ids

    def _check_length(self, num_prompt: int, max_tokens: int | None, prompt_param: str) -> int:
        limit = self.state.engine.max_model_len
        if num_prompt >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                           f"{num_prompt} tokens, which leaves no room for a completion.",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the completion). "
                "Please reduce the prompt or the completion length.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def _slo_class(self, request: web.Request, body: _SamplingFields) -> str | None:
        name = request.headers.get(SLO_CLASS_HEADER) or body.kvfleet_slo_class
        known = self.state.slo_classes
        if name is not None and known is not None and name not in known:
            raise APIError(f"Unknown SLO class '{name}'; known classes: {', '.join(sorted(known)) or 'none'}.",
                           param="kvfleet_slo_class", code="invalid_value")
        return name

    def _start(self, request: web.Request, body: _SamplingFields, request_id: str, prompt_ids: list[int],
               max_tokens: int, logprobs: int | None, n: int | None = None,
               json_schema: str | None = None) -> Generation:
        n = body.n if n is None else n
        try:
            bias = body.logit_bias_pairs(self.state.vocab_size)
        except ValueError as e:
            raise APIError(str(e), param="logit_bias", code="invalid_value") from e
        if body.min_tokens > max_tokens:
            raise APIError(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens}).",
                           param="min_tokens", code="invalid_value")
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=bias,
            min_tokens=body.min_tokens,
            n=n,
            json_schema=json_schema or (body.response_format.schema_text() if body.response_format else None),
        )
        greq = GenerationRequest(request_id, prompt_ids, sampling,
                                 variant=(self.state.variants or {}).get(body.model, self.state.variant),
                                 slo_class=self._slo_class(request, body))
        detoks = [self.state.tokenizer.detokenizer(prompt_ids) for _ in range(n)]
        return Generation(self.state.engine, greq, detoks, body.stop_list(), self.state.metrics, body.model,
                          trace=self._tracer(body, greq))

    def _tracer(self, body: _SamplingFields, greq: GenerationRequest) -> Callable[[Generation], RequestTrace] | None:
        """The factory of this request's span (None without telemetry)."""
        tel = self.state.telemetry
        if tel is None:
            return None
        klass = greq.slo_class or self.state.default_slo_class
        target = (self.state.slo_targets or {}).get(klass or "")
        operation = "chat" if isinstance(body, ChatCompletionRequest) else "text_completion"

        def make(gen: Generation) -> RequestTrace:
            s = self.state.engine.stats()
            return RequestTrace(tel, operation, body.model, greq.variant, klass, target, start=greq.arrival_time,
                                **{"kvfleet.request_id": greq.request_id,
                                   "gen_ai.request.max_tokens": greq.sampling.max_tokens,
                                   "kvfleet.kv_utilisation": s.kv_blocks_used / s.kv_blocks_total
                                   if s.kv_blocks_total else None})

        return make

    async def _admit(self, gens: list[Generation]) -> None:
        """Let the engine refuse (429) before any byte is sent; on a refusal, admitted siblings are released."""
        done: list[Generation] = []
        try:
            for g in gens:
                try:
                    await self.state.engine.admit(g.request)
                except ValueError as e:  # the engine refuses this request as it is (InvalidRequest names why)
                    raise APIError(str(e), param=getattr(e, "param", None), code="unsupported_value") from e
                done.append(g)
        except BaseException:
            for g in done:
                await self.state.engine.abort(g.request.request_id)
            raise

    # -- engine -> response -----------------------------------------------------

    async def _collect(self, gens: list[Generation], n: int) -> list[list[ChoiceResult]]:
        try:
            return await collect(gens, n)
        except ValueError as e:  # the engine's way of refusing a request it cannot serve
            raise APIError(str(e), param=getattr(e, "param", None)) from e

    async def _stream(self, request: web.Request, rid: str, gens: list[Generation], body: _SamplingFields,
                      chunk: Callable[[int, Piece, bool], list[dict[str, Any]]]) -> web.StreamResponse:
        """Server-sent events: per piece, one chunk per choice delta that `chunk` renders (maybe none)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": rid})
        await resp.prepare(request)
        include_usage = body.include_usage()
        obj = _chunk_object(body)
        seen: set[tuple[int, int]] = set()
        try:
            async with aclosing(merged(gens)) as pieces:
                async for g, piece in pieces:
                    first = (g, piece.index) not in seen
                    seen.add((g, piece.index))
                    for choice in chunk(g, piece, first):
                        payload = self._envelope(rid, body, obj, [choice])
                        if include_usage:
                            payload["usage"] = None
                        await resp.write(_sse(payload))
            if include_usage:
                await resp.write(_sse(self._envelope(rid, body, obj, [], gens)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; leaving `pieces` has already freed the engine requests
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            err = APIError(str(e), param=getattr(e, "param", None)) if isinstance(e, ValueError) else APIError(
                "The server had an error while generating.", status=500, type="server_error")
            if err.status >= 500:
                log.exception("generation of %s failed", rid)
            try:
                await resp.write(_sse(err.body()) + b"data: [DONE]\n\n")
                await resp.write_eof()
            except ConnectionError:
                pass
        return resp

    def _envelope(self, rid: str, body: _SamplingFields, obj: str, choices: list[dict[str, Any]],
                  gens: list[Generation] | None = None) -> dict[str, Any]:
        """The response object; with `gens`, the usage of all of them (every prompt and choice)."""
        out: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()),
                               "model": body.model, "system_fingerprint": None, "choices": choices}
        if gens is not None:
            out["usage"] = usage(sum(g.num_prompt_tokens for g in gens), sum(g.num_output_tokens for g in gens),
                                 sum(g.num_cached_tokens for g in gens))
        return out

    def _token_text(self, token_id: int) -> str:
        return self.state.tokenizer.decode([token_id])

    def _completion_logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        tokens = [self._token_text(lp.token_id) for lp in logprobs]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._token_text(t): v for t, v in lp.top} for lp in logprobs],
                "text_offset": offsets}

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in logprobs]


def _chunk_object(body: _SamplingFields) -> str:
    return "chat.completion.chunk" if isinstance(body, ChatCompletionRequest) else "text_completion"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
