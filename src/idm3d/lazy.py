"""Lazy package exports: ``import idm3d.data`` must not pay for MONAI until a name is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` of a package whose names live in its modules.

    Args:
        package: the package's ``__name__``.
        exports: module name (relative to the package) -> the public names it defines.
    """
    where = {name: module for module, names in exports.items() for name in names}
    names = sorted(where)

    def getattr_(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

    def dir_() -> list[str]:
        return list(names)

    return names, getattr_, dir_
