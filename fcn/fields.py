"""Parameter fields: how a params section declares a field (default, range, help), and the
checks and JSON Schema that follow from its type annotation, for any section dataclass.

The types a field may have: int, float (ints accepted), bool (never for a number), str,
a Literal of choices, a list of those, or a union with None; ranges apply to numbers and to
the numbers in a list.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from dataclasses import field
from typing import Any, Literal


def param(default: Any, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, help: str = "") -> Any:
    """A parameter field: its default and the numeric range it must lie in."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any) -> str:
    """repr, cut to a line: a wrong value may be a huge list, and the message stays one line."""
    return _REPR.repr(value)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _range_problem(value: Any, meta: dict[str, Any]) -> str | None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if v != v:  # NaN
            return "must be a number, got NaN"
        for key, op, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"),
                              ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):
            bound = meta.get(key)
            if bound is not None and not op(float(v), float(bound)):
                return f"must be {word} {bound}, got {v}"
    return None


def check_section(name: str, cls: type, raw: Any, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{name}: expected a mapping of parameters, got {_short(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            problems.append(f"{name}.{key}: unknown parameter (known: {', '.join(fields)})")
    values = {}
    for key, f in fields.items():
        if key not in raw:
            continue
        value, tp = raw[key], hints[key]
        if not _matches(value, tp):
            problems.append(f"{name}.{key}: expected {type_name(tp)}, got {_short(value)}")
            continue
        problem = _range_problem(value, f.metadata)
        if problem:
            problems.append(f"{name}.{key}: {problem}")
            continue
        if tp is float:
            value = float(value)
        elif typing.get_origin(tp) is list and typing.get_args(tp)[0] is float:
            value = [float(v) for v in value]
        values[key] = value
    return cls(**values)


def _schema_of(tp: Any) -> dict[str, Any]:
    """The JSON Schema of one field type (the types `_matches` accepts, the same way)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a) for a in typing.get_args(tp)]}
    if origin is list:
        return {"type": "array", "items": _schema_of(typing.get_args(tp)[0])}
    return {int: {"type": "integer"}, float: {"type": "number"}, bool: {"type": "boolean"},
            str: {"type": "string"}, type(None): {"type": "null"}}[tp]


def _with_range(schema: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    bounds = {key: meta[key] for key in ("ge", "gt", "le", "lt") if meta.get(key) is not None}
    if not bounds:
        return schema
    if schema.get("type") == "array":
        return {**schema, "items": _with_range(schema["items"], meta)}
    if "anyOf" in schema:
        return {"anyOf": [_with_range(s, meta) for s in schema["anyOf"]]}
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    return {**schema, **{names[key]: value for key, value in bounds.items()}}


def section_schema(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one section dataclass: its fields, no other keys."""
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        schema = _with_range(_schema_of(hints[f.name]), f.metadata)
        if f.metadata.get("help"):
            schema = {"description": f.metadata["help"], **schema}
        properties[f.name] = {**schema, "default": defaults[f.name]}
    return {"type": "object", "additionalProperties": False, "properties": properties}
