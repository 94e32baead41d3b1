"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status.

Handlers raise `APIError`; the app's middleware turns it (and anything
unexpected) into that JSON body, so a bad request never takes the server down.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import ValidationError


class APIError(Exception):
    """An error to return to the client in OpenAI's shape.

    `type` follows OpenAI's names: "invalid_request_error" for 4xx caused by
    the request, "not_found_error" for unknown models, "server_error" for 5xx.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def model_not_found(model: str, served: list[str]) -> APIError:
    return APIError(
        f"The model '{model}' does not exist. This server serves: {', '.join(served)}.",
        status=404,
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|none|list|dict|[a-z-]+\[.*\])$")


def _field_path(loc: tuple[int | str, ...]) -> list[int | str]:
    """The location without union members, which pydantic names by type ("str", "list[int]")."""
    return [p for p in loc if not (isinstance(p, str) and _TYPE_TAGS.match(p))]


def from_validation_error(err: ValidationError) -> APIError:
    """The first failing field, named by its dotted path (e.g. `messages.0.role`).

    A union field (`prompt`, `content`) fails once per member; the deepest of
    those errors says most about what is wrong, so that one is reported.
    """
    errors = err.errors()
    top = errors[0]["loc"][:1]
    first = max((e for e in errors if e["loc"][:1] == top), key=lambda e: len(_field_path(e["loc"])))
    param = ".".join(str(p) for p in _field_path(first["loc"])) or None
    message = first["msg"]
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}."
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
    return APIError(message, status=400, param=param, code=code)
