"""The node contract's values as JSON, and the line framing of the node API (cove.node.remote).

JSON has objects, arrays, strings, numbers, true/false and null; the contract also passes tuples
(`Seal`, `(id, handle)` pairs, `TemplateSpec.layers`), sets (`keep`, `ids()`), and the frozen
dataclasses `SandboxSpec`, `TemplateSpec` and `Limits`. Those travel as tagged objects,
`{"$t": "tuple" | "set" | "SandboxSpec" | "TemplateSpec" | "Limits", "v": ...}`, and a dict of the
caller's that happens to have a "$t" key travels as `{"$t": "dict", "v": {...}}`, so no value is
ever mistaken for another. A dataclass is rebuilt field by field against its annotations (unknown,
missing or mistyped fields are refused; an array where a tuple is declared becomes the tuple), so a
request from any client yields the same `SandboxSpec` the control plane would have built. No pickle:
a request can only ever produce these plain values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Union

from cove.node.base import Limits, SandboxSpec, TemplateSpec

TAG = "$t"
CLASSES: dict[str, type] = {"SandboxSpec": SandboxSpec, "TemplateSpec": TemplateSpec, "Limits": Limits}
LINE_LIMIT = 1 << 20  # bytes in one request or reply line: far above any real spec, far below harm


class WireError(ValueError):
    """A value that has no encoding, or a document that is not a valid encoding."""


def encode(value: Any) -> Any:
    """`value` as a JSON-able document."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WireError(f"cannot send the number {value}")
        return value
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {TAG: "tuple", "v": [encode(v) for v in value]}
    if isinstance(value, set | frozenset):
        items = sorted(value) if all(isinstance(v, str) for v in value) else list(value)
        return {TAG: "set", "v": [encode(v) for v in items]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise WireError("cannot send a dict whose keys are not all strings")
        body = {k: encode(v) for k, v in value.items()}
        return {TAG: "dict", "v": body} if TAG in value else body
    name = type(value).__name__
    if CLASSES.get(name) is type(value):
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {TAG: name, "v": fields}
    raise WireError(f"cannot send a {name}")


def decode(doc: Any) -> Any:
    """The value `doc` encodes (the inverse of `encode`)."""
    if doc is None or isinstance(doc, bool | str | int | float):
        return doc
    if isinstance(doc, list):
        return [decode(v) for v in doc]
    if not isinstance(doc, dict):
        raise WireError(f"not a JSON value: {type(doc).__name__}")
    if TAG not in doc:
        return {k: decode(v) for k, v in doc.items()}
    tag, body = doc[TAG], doc.get("v")
    if set(doc) != {TAG, "v"}:
        raise WireError(f"a tagged value has exactly the keys {TAG!r} and 'v', not {sorted(doc)}")
    if tag == "tuple" and isinstance(body, list):
        return tuple(decode(v) for v in body)
    if tag == "set" and isinstance(body, list):
        try:
            return {decode(v) for v in body}
        except TypeError:
            raise WireError("a set holds only hashable values") from None
    if tag == "dict" and isinstance(body, dict):
        return {k: decode(v) for k, v in body.items()}
    if isinstance(tag, str) and tag in CLASSES and isinstance(body, dict):
        return _rebuild(CLASSES[tag], body)
    raise WireError(f"unknown or malformed tagged value {str(tag)[:40]!r}")


_HINTS: dict[type, dict[str, Any]] = {}


def _rebuild(cls: type, body: dict[str, Any]) -> Any:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise WireError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    values: dict[str, Any] = {}
    for name, raw in body.items():
        value = decode(raw)
        hint = hints[name]
        if isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)  # a client without tuples sends an array
        if not _conforms(value, hint):
            raise WireError(f"{cls.__name__}.{name} must be {_name(hint)}, not {type(value).__name__}")
        values[name] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise WireError(f"{cls.__name__} needs the field {missing[0]!r}")
    return cls(**values)


def _conforms(value: Any, hint: Any) -> bool:
    """Does `value` have the type `hint` (the annotations the contract's dataclasses use)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(args) == len(value) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return False


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


# -- framing: one JSON document per line ------------------------------------------------------------
def line(doc: dict[str, Any]) -> bytes:
    """`doc` (already encoded) as one request or reply line."""
    try:
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode() + b"\n"
    except (TypeError, ValueError) as e:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise WireError(f"cannot send this document: {e}") from None


def parse(raw: bytes) -> dict[str, Any]:
    """A request or reply line as its JSON object."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise WireError(f"not a JSON line: {e}") from None
    if not isinstance(doc, dict):
        raise WireError("a line holds one JSON object")
    return doc
