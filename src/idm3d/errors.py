"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

__all__ = ["ArgumentError", "CheckpointError", "ConfigError", "DataError", "IDM3DError", "NonFiniteError"]


class ArgumentError(ValueError):
    """A bad argument of a lower-layer function (``data``, ``diffusion``, ``nets``, ``devices``).

    ``argument`` is the argument's name and ``detail`` the fault; ``str()`` is ``"argument: detail"``, so a
    library user sees one line naming the argument. Upper layers map ``argument`` to the option it came
    from through a table (``patch_size`` -> ``data.patch_size``) and never parse the message. It is not an
    :class:`IDM3DError`: one that no layer maps is a bug and keeps its traceback.
    """

    def __init__(self, argument: str, detail: str) -> None:
        super().__init__(f"{argument}: {detail}")
        self.argument = argument
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across processes (DataLoader workers)
        return type(self), (self.argument, self.detail)


class IDM3DError(ValueError):
    """Base of every user-facing error; the message names the file or option and the fault."""


class DataError(IDM3DError):
    """A data file or folder is unreadable, malformed or inconsistent."""


class ConfigError(IDM3DError):
    """A configuration key or command-line option is unknown or has a bad value."""


class CheckpointError(IDM3DError):
    """A checkpoint is missing, corrupt, tampered with, or belongs to another architecture."""


class NonFiniteError(IDM3DError):
    """Training produced NaN/Inf values too many steps in a row."""
