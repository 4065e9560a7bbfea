"""One loader for every config section: plain data (a TOML table, a saved config's JSON) to dataclasses.

`from_dict` checks each key against the dataclass' fields and each value against its type annotation (`Literal[...]`
choices included, so a choice field's allowed values live in its type alone), converting where TOML and JSON cannot
say it (lists to tuples, ints to floats). Every error names the key (`train.schedule`, `model.perceiver.depth`).
Checks a type cannot express stay beside each section (its `__post_init__`, or the run's `validate`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from .errors import InputError


def type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) != len(typing.get_args(tp))
    return tp, False


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from TOML or parsed from the command line) checked against / converted to type `tp`."""
    tp, optional = unwrap_optional(tp)
    if tp is Any:  # free-form (an HF config dict): taken as it is, nulls included
        return value
    if value is None:
        if optional:
            return None
        raise InputError(f"{key}: a value is required ({type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if typing.get_origin(tp) in (Union, types.UnionType):  # e.g. str | list[str]: the first member that fits
        for member in typing.get_args(tp):
            if member is type(None):
                continue
            try:
                return coerce(value, member, key)
            except InputError:
                pass
        raise InputError(f"{key}: expected {type_name(tp)}, got {value!r}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = InputError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise InputError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(
                coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        item = args[1] if args else Any
        return {k: coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: unsupported config type {tp}")


def from_dict(cls, data: Any, key: str):
    """Dataclass `cls` from a dict: unknown keys, missing required keys and bad values name the key."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise InputError(f"{key}: expected a table, got {data!r}")
    types_ = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{_join(key, unknown[0])}: unknown key; known keys of {key}: {', '.join(fields)}")
    values = {name: coerce(v, types_[name], _join(key, name)) for name, v in data.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{_join(key, missing[0])}: missing required key")
    try:
        return cls(**values)
    except ValueError as error:  # __post_init__ checks (e.g. model.vision) already say what is wrong
        raise InputError(f"{key}: {error}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_choices(config, where: str) -> None:
    """Every `Literal[...]` field of dataclass `config` holds one of its choices; the error names the field."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        choices = _literal_choices(hints[f.name])
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            raise InputError(
                f"{where}.{f.name}={value!r} is not known; expected one of {', '.join(map(repr, choices))}"
            )


def _literal_choices(hint) -> tuple | None:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is Literal:
                return (*typing.get_args(arg), None)
    return None
