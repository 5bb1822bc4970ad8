"""Plain data (YAML/JSON, ``--set`` values) -> the config dataclasses, each value checked on the way.

Generic over any dataclass: a field's annotation gives its type, its ``metadata`` (:func:`field_range`) its
range. A bad value raises a one-line ``ConfigError`` naming the key (``train.lr: expected a number > 0,
got -1``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from idm3d.errors import ConfigError

__all__ = ["build", "field_range"]

_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def field_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    """A dataclass field's ``metadata``: the bounds its numbers (or each item of its list) must keep.

    Args:
        lo: lower bound (``None``: none).
        hi: upper bound, inclusive (``None``: none).
        lo_open: ``lo`` itself is out of range.
    """
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """Return ``value`` checked against type ``tp`` (and range ``meta``); raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, meta)
            except ConfigError as err:
                errors.append(err)
                if isinstance(value, (list, tuple)) and typing.get_origin(arg) is list:
                    raise  # a list for the list alternative: its own error names the faulty item
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {'|'.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        _check_range(value, key, meta, "an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        _check_range(value, key, meta, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise ConfigError(f"{key}: unsupported option type {tp!r}")  # pragma: no cover - programming error


def _check_range(value: float, key: str, meta: Mapping[str, Any], what: str) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        lo_txt = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_txt = "" if hi is None else f"<= {hi}"
        bounds = " and ".join(t for t in (lo_txt, hi_txt) if t)
        raise ConfigError(f"{key}: expected {what} {bounds}, got {value!r}")


# Deprecated option -> (its replacement in the same section, old value -> new value). Read with a
# FutureWarning and stored under the new name, so configs of older runs still load.
_DEPRECATED: dict[str, tuple[str, dict[str, str]]] = {
    "train.autocast": ("precision", {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}),
}


def _translate_deprecated(data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    for key, (new, values) in _DEPRECATED.items():
        section, old = key.rsplit(".", 1)
        if section != prefix or old not in data:
            continue
        value = data[old]
        if not isinstance(value, str) or value not in values:
            raise ConfigError(f"{key}: expected one of {'|'.join(values)}, got {value!r} "
                              f"(deprecated: use {section}.{new})")
        data = {k: v for k, v in data.items() if k != old}
        if new in data and data[new] != values[value]:
            raise ConfigError(f"{key}: {value!r} contradicts {section}.{new}={data[new]!r} "
                              f"(deprecated: set only {section}.{new})")
        data[new] = values[value]
        warnings.warn(f"{key} is deprecated; use {section}.{new}={values[value]}", FutureWarning, stacklevel=2)
    return data


def build(cls: type, data: Any, prefix: str) -> Any:
    """Return ``cls(**data)`` with every value checked; missing keys take their defaults.

    Args:
        cls: a config dataclass.
        data: its options as plain data (``None``: all defaults).
        prefix: the section's key (``"train"``), named in errors; ``""`` for the whole config.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value (one line, naming the key).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of options, got {data!r}")
    data = _translate_deprecated(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(f"{where}: unknown option (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key, fields[name].metadata)
    return cls(**kwargs)
