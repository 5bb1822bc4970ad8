"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "IDM3DError", "NonFiniteError"]


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
