"""Parse a manifest (dict) into its typed resource, with errors that name field paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import KIND_BY_NAME, Resource
from .common import RuleViolation


@dataclass(frozen=True)
class FieldError:
    path: str  # dotted, e.g. "spec.topology.prefill" ("" = the object itself)
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<object>'}: {self.message}"


class InvalidResource(ValueError):
    """A manifest that does not satisfy the schema or a cross-field rule."""

    def __init__(self, kind: str, name: str, errors: list[FieldError]):
        self.kind, self.name, self.errors = kind, name, errors
        super().__init__(f"{kind} {name!r} is invalid: " + "; ".join(map(str, errors)))


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif "[" in item or item in ("int", "str") or item.startswith("constrained-"):
            continue  # union branch labels pydantic adds (e.g. "int", "constrained-str")
        else:
            parts.append(item)
    return ".".join(parts)


def _error_path(err: Any) -> str:
    """The dotted path of an error; a rule's fieldPath extends its object's path."""
    path = _path(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, RuleViolation) and cause.rule.field_path:
        path = f"{path}{cause.rule.field_path}" if path else cause.rule.field_path.lstrip(".")
    return path


def _message(err: Any) -> str:
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def parse(manifest: dict[str, Any]) -> Resource:
    """Validate `manifest` (a kvfleet custom resource as a dict) into its model."""
    kind = manifest.get("kind", "")
    name = (manifest.get("metadata") or {}).get("name", "")
    if kind not in KIND_BY_NAME:
        raise InvalidResource(kind or "<no kind>", name, [FieldError("kind", f"unknown kind {kind!r}")])
    try:
        return KIND_BY_NAME[kind].model.model_validate(manifest)
    except ValidationError as exc:
        errors = [FieldError(_error_path(e), _message(e)) for e in exc.errors()]
        raise InvalidResource(kind, name, errors) from None
