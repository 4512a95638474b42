"""Dataclasses <-> JSON objects, and their JSON Schema, from one declaration: the fields and their type hints.

A ``JsonRecord`` writes its fields as JSON keys in field order, then the keys it does not know (``extra``, its
last field), so a manifest written by a newer tpugraph keeps them when read and written again. A field marked
``optional()`` is left out of the JSON while it holds its default: the record of an option that was not used
is absent, not null. Values are stored as JSON reads them (no coercion), so a record writes what it read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any, ClassVar

OMIT_DEFAULT = "omit_default"
JSON_KEY = "json_key"
NOT_JSON = "not_json"


class TextEnum(str, Enum):
    """A str-valued Enum that compares, serialises and formats as its value (Python 3.11's StrEnum, on 3.10 too):
    ``f"{SegmentKind.BLOCK}"`` is "block", as the plain strings it replaces were."""

    __str__ = str.__str__
    __format__ = str.__format__


def optional(default: Any = None, key: str | None = None) -> Any:
    """A field whose key is absent from the JSON while it holds ``default``."""
    return dataclasses.field(default=default, metadata={OMIT_DEFAULT: True, **({JSON_KEY: key} if key else {})})


def not_json(default: Any = None) -> Any:
    """A field that lives in memory only: never written to nor read from the JSON (nor in its schema)."""
    return dataclasses.field(default=default, compare=False, metadata={NOT_JSON: True})


def extra_keys() -> Any:
    return dataclasses.field(default_factory=dict)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get(JSON_KEY, f.name)


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name != "extra" and not f.metadata.get(NOT_JSON)]


class JsonRecord:
    """Base of the typed records: ``to_json``/``from_json`` and ``json_schema`` from the dataclass fields."""

    extra: dict[str, Any]
    # A subclass may name a field whose value decides which record class reads a union-typed field.
    union_readers: ClassVar[dict[str, Any]] = {}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in _fields(self):
            value = getattr(self, f.name)
            if f.metadata.get(OMIT_DEFAULT) and value == f.default:
                continue
            out[_key(f)] = dump(value)
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} must be a JSON object, not {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        known = set()
        for f in _fields(cls):
            key = _key(f)
            known.add(key)
            if key in data:
                reader = cls.union_readers.get(f.name)
                kwargs[f.name] = reader(data[key]) if reader else load(hints[f.name], data[key])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}.{key}")
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})


def dump(value: Any) -> Any:
    if hasattr(value, "to_json"):  # a record, or a frozen value type with its own JSON form (TensorSpec)
        return value.to_json()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value


def _args(tp) -> tuple:
    return typing.get_args(tp)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def load(tp, value: Any) -> Any:
    """``value`` as read from JSON, as the type hint ``tp`` holds it."""
    if value is None:
        return None
    if _is_union(tp):
        inner = [a for a in _args(tp) if a is not type(None)]
        return load(inner[0], value) if len(inner) == 1 else value
    origin = typing.get_origin(tp)
    if origin is list:
        return [load(_args(tp)[0], v) for v in value]
    if origin is dict:
        return {k: load(_args(tp)[1], v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if isinstance(tp, type) and hasattr(tp, "from_json"):
        return tp.from_json(value)
    return value


# -- JSON Schema -------------------------------------------------------------------------------------------

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def type_schema(tp, defs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any:
        return {}
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    if _is_union(tp):
        return {"anyOf": [type_schema(a, defs) for a in _args(tp)]}
    origin = typing.get_origin(tp)
    if origin is list:
        return {"type": "array", "items": type_schema(_args(tp)[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(_args(tp)[1], defs)}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return {"enum": [m.value for m in tp]}
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder: a record may refer to itself
            defs[tp.__name__] = record_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if isinstance(tp, type) and hasattr(tp, "json_schema"):  # a value type that states its own schema
        defs.setdefault(tp.__name__, tp.json_schema())
        return {"$ref": f"#/$defs/{tp.__name__}"}
    raise TypeError(f"no JSON Schema for {tp!r}")


def record_schema(cls, defs: dict[str, Any]) -> dict[str, Any]:
    """The object schema of a record: its keys typed, the keys without default required, any other key allowed
    (records keep keys they do not know)."""
    hints = typing.get_type_hints(cls)
    properties = {_key(f): type_schema(hints[f.name], defs) for f in _fields(cls)}
    required = [_key(f) for f in _fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if cls.__doc__:
        schema = {"description": " ".join(cls.__doc__.split()), **schema}
    if required:
        schema["required"] = required
    return schema
