"""The codec of the typed messages (messages.py): a dataclass written as its wire object, and read back
with each field's type checked against its annotation.

Each class's fields are read once into a plan (what to do with each field's value), so writing and
reading a message costs a pass over its fields, not a walk through its annotations: a request
crosses this codec several times on its way (generate out, done back).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, Callable, Union


class ProtocolError(ValueError):
    """A message whose fields are missing or of the wrong type; the text names the field."""


Reader = Callable[[Any, str], Any]  # (a field's wire value, its path for errors) -> its Python value


@cache
def _write_plan(cls: type) -> tuple[tuple[str, int], ...]:
    """(field, 0: as it is | 1: a dataclass | 2: a tuple, written as a list)."""
    hints, plan = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        hint = _without_none(hints[f.name])
        plan.append((f.name, 1 if dataclasses.is_dataclass(hint) else 2 if typing.get_origin(hint) is tuple else 0))
    return tuple(plan)


def write_fields(instance: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in _write_plan(type(instance)):
        value = getattr(instance, name)
        if kind and value is not None:
            value = value.to_wire() if kind == 1 else list(value)
        out[name] = value
    return out


@cache
def _read_plan(cls: type) -> tuple[tuple[str, Reader, bool], ...]:
    """(field, its reader, whether it is required)."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            _reader(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def read_fields(cls: type, message: Any, where: str) -> Any:
    if not isinstance(message, dict):
        raise ProtocolError(f"{where}: expected an object")
    values = {}
    for name, read, required in _read_plan(cls):
        if name in message:
            values[name] = read(message[name], f"{where}.{name}")
        elif required:
            raise ProtocolError(f"{where}.{name}: missing")
    return cls(**values)


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _reader(hint: Any) -> Reader:
    """How a value is read as the annotation ``hint`` wants it (lists become tuples), or ProtocolError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner, nullable = _reader(_without_none(hint)), type(None) in args
        return lambda value, where: None if value is None and nullable else inner(value, where)
    if dataclasses.is_dataclass(hint):
        return lambda value, where: read_fields(hint, value, where)
    if origin is tuple:
        item = _reader(args[0])

        def read_tuple(value: Any, where: str) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise ProtocolError(f"{where}: expected a list")
            return tuple(item(each, f"{where}[{i}]") for i, each in enumerate(value))

        return read_tuple
    if origin is dict or hint is dict:
        return _checked(lambda value: isinstance(value, dict), "an object")
    if hint is Any:
        return lambda value, where: value
    if hint is bool:
        return _checked(lambda value: isinstance(value, bool), "bool")
    if hint is int:
        return _checked(lambda value: isinstance(value, int) and not isinstance(value, bool), "int")
    if hint is float:
        number = _checked(lambda value: isinstance(value, (int, float)) and not isinstance(value, bool), "float")
        return lambda value, where: float(number(value, where))
    return _checked(lambda value: isinstance(value, hint), getattr(hint, "__name__", str(hint)))


def _checked(ok: Callable[[Any], bool], expected: str) -> Reader:
    def read(value: Any, where: str) -> Any:
        if not ok(value):
            raise ProtocolError(f"{where}: expected {expected}")
        return value

    return read
