"""Hypothesis strategies from the JSON Schema subset pydantic emits for the request models.

NOTE: hypothesis-jsonschema 0.23 (its latest) fails on current Hypothesis (`many.more` is gone),
so this small converter covers what the published OpenAPI document uses: type (one or a list),
anyOf, const/enum, object properties/required/additionalProperties, array items/minItems/maxItems,
numeric minimum/maximum (exclusive too), string minLength/maxLength. Unknown keywords are ignored:
the draw may then break the schema, which the fuzz test checks with jsonschema anyway.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

TEXT = st.text(max_size=60)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that (for the keywords above) satisfy `schema`; `$ref`s must already be inlined."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        return _number(schema, kind)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=max(schema.get("maxLength", 60),
                                                                          schema.get("minLength", 0)))
    if kind == "array":
        items = from_schema(schema.get("items", {}))
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=schema.get("maxItems", 4))
    if kind == "object" or "properties" in schema:
        return _object(schema)
    return st.one_of(st.none(), st.booleans(), st.integers(-10, 10), TEXT)


def _number(schema: dict[str, Any], kind: str) -> st.SearchStrategy[Any]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if kind == "integer":
        lo = lo if xlo is None else int(xlo) + 1
        hi = hi if xhi is None else int(xhi) - 1
        return st.integers(min_value=lo, max_value=hi)
    return st.floats(min_value=lo if xlo is None else xlo, max_value=hi if xhi is None else xhi,
                     exclude_min=xlo is not None, exclude_max=xhi is not None, allow_nan=False, allow_infinity=False)


def _object(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    props = schema.get("properties", {})
    required = [k for k in schema.get("required", []) if k in props]
    optional = [k for k in props if k not in required]
    extra = schema.get("additionalProperties")

    @st.composite
    def draw_object(draw: st.DrawFn) -> dict[str, Any]:
        out = {k: draw(from_schema(props[k])) for k in required}
        for k in draw(st.lists(st.sampled_from(optional), unique=True, max_size=len(optional))) if optional else []:
            out[k] = draw(from_schema(props[k]))
        if isinstance(extra, dict):  # a map (e.g. logit_bias)
            for k in draw(st.lists(TEXT, max_size=3, unique=True)):
                out.setdefault(k, draw(from_schema(extra)))
        return out

    return draw_object()
