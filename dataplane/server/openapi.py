"""The OpenAPI 3.1 document the server publishes at GET /openapi.json.

Request bodies are the pydantic request models themselves (`protocol.py`), so the
document cannot drift from what the handlers accept; responses name their shape
and every error status carries OpenAI's error object. Clients, gateways and the
schema-driven fuzz tests (tests/dataplane/server/test_fuzz_http.py) read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kvfleet.dataplane.server.protocol import ChatCompletionRequest, CompletionRequest
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "The request is malformed or asks for something this server cannot do.",
               404: "Unknown model or route.", 405: "Method not allowed on this route.",
               413: "The body is too large.", 429: "Overloaded: a sheddable request was refused.",
               500: "A server error (a bug: never caused by the request alone)."}
    return {str(s): _json({"$ref": REF.format(model="Error")}, reasons[s]) for s in statuses}


def _generation(model: str, summary: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}},
        "responses": {
            "200": {"description": "The completion (JSON), or server-sent events when `stream` is true.",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(400, 404, 413, 429, 500),
        },
    }}


def openapi_document(served_model_names: Iterable[str]) -> dict[str, Any]:
    """The whole document; `served_model_names` are listed as the `model` values that exist."""
    _, schemas = models_json_schema(
        [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")], ref_template=REF)
    components = dict(schemas.get("$defs", {}))
    components["Error"] = ERROR_SCHEMA
    names = list(served_model_names)
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        components[request]["properties"]["model"]["examples"] = names
    get_json = {"get": {"responses": {"200": _json({"type": "object"}, "OK"), **_errors(500)}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvfleet OpenAI-compatible API", "version": "v1",
                 "description": f"Serves: {', '.join(names)}. Errors use OpenAI's error object."},
        "paths": {
            "/v1/completions": _generation("CompletionRequest", "Text completion"),
            "/v1/chat/completions": _generation("ChatCompletionRequest", "Chat completion"),
            "/v1/models": get_json,
            "/health": get_json,
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": get_json,
        },
        "components": {"schemas": components},
    }
