"""A network that describes itself: the constructor arguments it was built with (diffusers' ``register_to_config``).

:func:`records_config` decorates a module class: each instance keeps the arguments of its ``__init__``
call, defaults filled in, and answers them as :attr:`config`; ``type(net)(**net.config)`` builds the same
architecture again. :func:`call_arguments` is the same resolution for any class without building it
(the model factory uses it for MONAI's ``DiffusionModelUNet``, which has no ``config``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["call_arguments", "records_config"]

T = TypeVar("T", bound=type)
_ATTR = "_init_config"


def call_arguments(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every parameter of ``fn`` (a class: its ``__init__``, without ``self``) as this call binds it,
    defaults included; ``**kwargs`` of a catch-all parameter are merged in by name.

    Raises:
        TypeError: the call does not fit the signature (an unknown or missing argument).
    """
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{name}: extra positional arguments cannot be recorded by name")
        else:
            out[name] = value
    return out


def records_config(cls: T) -> T:
    """Class decorator: instances remember their constructor arguments, read back as ``net.config``.

    Only the decorated class's own ``__init__`` records (a subclass that calls ``super().__init__`` with
    other arguments records nothing unless it is decorated too).
    """
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__init__ is __init__:
            object.__setattr__(self, _ATTR, call_arguments(functools.partial(init, self), *args, **kwargs))

    def config(self: Any) -> dict[str, Any]:
        """The constructor arguments this network was built with, defaults included (a copy)."""
        recorded = getattr(self, _ATTR, None)
        if recorded is None:
            raise AttributeError(f"{type(self).__name__}: its constructor arguments were not recorded")
        return dict(recorded)

    cls.__init__ = __init__  # type: ignore[misc]
    cls.config = property(config)  # type: ignore[attr-defined]
    return cls
