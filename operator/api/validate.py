"""Parse a manifest (dict) into its typed resource, with errors that name field paths."""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

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


def _unwrap(annotation: Any) -> Any:
    """The type inside Annotated[...] and X | None."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation


def _path(loc: tuple[int | str, ...], model: Any = None) -> str:
    """The API server's spelling of a pydantic location: `a.b[0].c`, map keys as `m[key]`."""
    parts: list[str] = []
    current = model  # the type at this point of the path, when known
    for item in loc:
        kind = get_origin(current)
        if isinstance(item, int) or kind is dict:
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            args = get_args(current)
            current = _unwrap(args[-1]) if args else None
        elif "[" in item or item in ("int", "str") or item.startswith(("constrained-", "function-")):
            continue  # union branch labels pydantic adds (e.g. "int", "constrained-str")
        else:
            parts.append(item)
            current = _field_type(current, item)
    return ".".join(parts)


def _field_type(model: Any, alias: str) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel):
        for name, field in model.model_fields.items():
            if alias in (name, field.alias):
                return _unwrap(field.annotation)
    return None


def _error_path(err: Any, model: Any = None) -> str:
    """The dotted path of an error; a rule's fieldPath extends its object's path."""
    path = _path(err["loc"], model)
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
        model = KIND_BY_NAME[kind].model
        errors = [FieldError(_error_path(e, model), _message(e)) for e in exc.errors()]
        raise InvalidResource(kind, name, errors) from None
