"""``model.kwargs`` checked against the network's own signature when a config is loaded.

The network's constructor is the schema (as a diffusers model's signature is its config): a key it does
not take, one the task sets, or a value whose type contradicts the annotation is refused in one line
naming the key, before any network is built.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from idm3d.errors import ConfigError
from idm3d.runs.model_factory import SET_BY_TASK, model_class

__all__ = ["check_model_kwargs"]


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}
        return f"a list of {plural.get(args[0], _type_text(args[0]))}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _fits(value: Any, tp: Any) -> bool:
    """False only where ``value`` clearly contradicts the annotation ``tp`` (unknown types fit)."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return not args or all(_fits(v, args[0]) for v in value)
    return True


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Check ``model.kwargs`` against the network's own signature (run when a config is loaded).

    Raises:
        ConfigError: one line naming the key: one the task sets (``in_channels``...), one the network does
            not take (with the closest argument name), or a value whose type contradicts the annotation.
    """
    for key in SET_BY_TASK:
        if key in kwargs:
            raise ConfigError(
                f"model.kwargs.{key}: set by the task (data.targets/data.sources), remove it from model.kwargs"
            )
    try:
        cls = model_class(name)
    except ConfigError:
        return  # an unavailable network is reported when it is built
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not resolve: names are still checked
        hints = {}
    known = [p for p in params if p not in SET_BY_TASK]
    for key, value in kwargs.items():
        if key not in params:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"model.kwargs.{key}: not an argument of {cls.__name__}{hint}")
        tp = hints.get(key, inspect.Parameter.empty)
        if not _fits(value, tp):
            raise ConfigError(f"model.kwargs.{key}: expected {_type_text(tp)}, got {value!r}")
