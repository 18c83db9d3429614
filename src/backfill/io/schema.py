"""Typed output columns: map a JSON Schema (as pydantic emits it) to Arrow types, and answers to Arrow rows.

Whatever has no single Arrow type (mixed unions, free-form objects) becomes a string
column holding JSON text; such fields carry the metadata {"backfill.json": "1"}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from backfill.errors import SpecError

JSON_TEXT_KEY = b"backfill.json"
JSON_TEXT = {JSON_TEXT_KEY: b"1"}
_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


class _JsonText:
    """Sentinel for types that become JSON text (distinct from a real string column)."""


def _resolve(
    schema: Mapping[str, Any], root: Mapping[str, Any], seen: frozenset[str]
) -> tuple[Mapping[str, Any], frozenset[str]]:
    """Follow $ref (and a lone allOf wrapper, which older pydantic emits) to the schema it names."""
    while True:
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref in seen or not isinstance(ref, str) or not ref.startswith("#/"):
                return {}, seen  # recursive or external: JSON text
            target: Any = root
            for part in ref[2:].split("/"):
                target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, Mapping) else None
            if not isinstance(target, Mapping):
                raise SpecError(f"The output schema refers to '{ref}', which it does not define.")
            seen = seen | {ref}
            schema = target
        elif isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
            schema = schema["allOf"][0]
        else:
            return schema, seen


def _type_of(schema: Mapping[str, Any], root: Mapping[str, Any], seen: frozenset[str]) -> pa.DataType | type[_JsonText]:
    schema, seen = _resolve(schema, root, seen)
    for union in ("anyOf", "oneOf"):
        if isinstance(schema.get(union), list):
            options = [o for o in schema[union] if not _is_null(o, root)]
            if len(options) == 1:
                return _type_of(options[0], root, seen)
            return _JsonText
    if "enum" in schema or "const" in schema:
        values = [v for v in schema.get("enum", [schema.get("const")]) if v is not None]
        kinds = {_value_kind(v) for v in values}
        return _SCALARS[kinds.pop()] if len(kinds) == 1 and None not in kinds else _JsonText
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            return _JsonText
        kind = kinds[0]
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        items = schema.get("items")
        if not isinstance(items, Mapping):
            return _JsonText
        item = _type_of(items, root, seen)
        return pa.list_(_field("item", item))
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties")
        if not isinstance(props, Mapping) or not props:
            return _JsonText  # free-form objects (dict[str, X]) have no fixed columns
        return pa.struct([_field(name, _type_of(sub, root, seen)) for name, sub in props.items()])
    return _JsonText


def _is_null(schema: Any, root: Mapping[str, Any]) -> bool:
    if not isinstance(schema, Mapping):
        return False
    schema, _ = _resolve(schema, root, frozenset())
    return schema.get("type") == "null" or ("const" in schema and schema["const"] is None)


def _value_kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return None


def _field(name: str, t: pa.DataType | type[_JsonText]) -> pa.Field:
    if t is _JsonText:
        return pa.field(name, pa.string(), metadata=JSON_TEXT)
    assert isinstance(t, pa.DataType)
    return pa.field(name, t)


def arrow_type_for(json_schema: Mapping[str, Any], *, root: Mapping[str, Any] | None = None) -> pa.DataType:
    """One property's JSON Schema → Arrow type; `root` is the document its $refs point into."""
    t = _type_of(json_schema, root if root is not None else json_schema, frozenset())
    return pa.string() if t is _JsonText else t  # type: ignore[return-value]


def output_fields(json_schema: Mapping[str, Any]) -> list[pa.Field]:
    """The top-level properties of an object schema → Arrow fields, in property order (all nullable)."""
    schema, seen = _resolve(json_schema, json_schema, frozenset())
    props = schema.get("properties")
    if schema.get("type", "object") != "object" or not isinstance(props, Mapping) or not props:
        raise SpecError("The output schema must be a JSON object with properties, one per output column.")
    return [_field(name, _type_of(sub, json_schema, seen)) for name, sub in props.items()]


def _converter(field: pa.Field) -> Callable[[Any], Any] | None:
    """How to turn a parsed JSON value into what Arrow expects for `field`; None when it is already right."""
    if field.metadata and field.metadata.get(JSON_TEXT_KEY):
        return lambda v: None if v is None else json.dumps(v, ensure_ascii=False)
    t = field.type
    if pa.types.is_integer(t):
        return _to_int
    if pa.types.is_list(t):
        inner = _converter(t.value_field)
        if inner is None:
            return None
        return lambda v: [inner(x) for x in v] if isinstance(v, list) else v
    if pa.types.is_struct(t):
        subs = [(f.name, _converter(f)) for f in t]
        if all(c is None for _, c in subs):
            return None
        return lambda v: {n: (c(v.get(n)) if c else v.get(n)) for n, c in subs} if isinstance(v, Mapping) else v
    return None


def _to_int(v: Any) -> Any:
    if isinstance(v, float):
        if not v.is_integer():
            # pyarrow would silently truncate 2.5 to 2.
            raise pa.ArrowInvalid(f"{v} is not an integer")
        return int(v)
    return v


def output_table(answers: Sequence[Mapping[str, Any] | None], fields: Sequence[pa.Field]) -> pa.Table:
    """Parsed structured answers (one dict per row; None for a row without one) → a table with `fields`.

    JSON-text fields are serialised and integral floats (3.0) become ints; a value that
    still does not fit its type raises a pyarrow error (pa.ArrowInvalid or pa.ArrowTypeError).
    """
    columns = []
    for field in fields:
        convert = _converter(field)
        values = [None if a is None else a.get(field.name) for a in answers]
        if convert is not None:
            values = [None if v is None else convert(v) for v in values]
        columns.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(list(fields)))
