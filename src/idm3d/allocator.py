"""The ``IDM3D_MALLOC`` runtime option: keep a CPU process's resident memory near its live tensors.

``IDM3D_MALLOC=tuned`` makes the ``idm3d`` command, at start-up and before anything imports torch,
(1) fix glibc's mmap and trim thresholds with ``mallopt`` (as ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` would), so every block over 128 KiB is an ``mmap`` returned to the system
when freed instead of heap memory that stays resident, and (2) set ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's
switch for transparent huge pages in its CPU allocator, so those fresh blocks fault in 2 MiB at a time
rather than 4 KiB. The default ``system`` keeps glibc's and PyTorch's behaviour: fresh pages cost CPU
time, which a time-budgeted run pays in steps. PyTorch reads its switch once, when it is imported; the
benchmarks start each child with the value its setting implies (:func:`huge_pages_for`), and a value
the user set is always kept. Off glibc (macOS, musl) the thresholds are a no-op. Measured effects and
their commands: docs/measurements.md, "Allocator".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from idm3d.errors import ConfigError

__all__ = [
    "ENV_VAR",
    "HUGE_PAGES_ENV",
    "MMAP_THRESHOLD",
    "SETTINGS",
    "configure_from_env",
    "enable_huge_pages",
    "huge_pages_for",
    "tune_malloc",
]

ENV_VAR = "IDM3D_MALLOC"
SETTINGS = ("tuned", "system")  # the values of IDM3D_MALLOC and of the benchmarks' --malloc
DEFAULT = "system"  # glibc's and PyTorch's own behaviour
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch, read when torch is imported
MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value, kept fixed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
_applied: dict[str, int] | None = None
_USER_HUGE_PAGES = os.environ.get(HUGE_PAGES_ENV)  # the user's own choice, before idm3d sets it


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds (``trim_threshold`` defaults to ``mmap_threshold``).

    Returns:
        ``True`` when glibc accepted both settings, ``False`` where there is no ``mallopt``.
    """
    global _applied
    if mmap_threshold < 0 or (trim_threshold is not None and trim_threshold < 0):
        raise ValueError(f"tune_malloc: thresholds must be >= 0, got {mmap_threshold}, {trim_threshold}")
    trim = mmap_threshold if trim_threshold is None else trim_threshold
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, int(trim)) == 1
    if ok:
        _applied = {"mmap_threshold": int(mmap_threshold), "trim_threshold": int(trim)}
    return ok


def configure_from_env() -> dict[str, int] | None:
    """Apply :func:`tune_malloc` and :func:`enable_huge_pages` when ``IDM3D_MALLOC=tuned``.

    The default ``system`` keeps glibc's and PyTorch's defaults.

    Returns:
        The thresholds applied, or ``None``.
    """
    choice = os.environ.get(ENV_VAR, DEFAULT).strip().lower()
    if choice == DEFAULT:
        return None
    if choice not in SETTINGS:
        raise ConfigError(f"{ENV_VAR}: expected one of {', '.join(SETTINGS)}, got {os.environ[ENV_VAR]!r}")
    enable_huge_pages()  # effective only before torch is imported
    return dict(_applied or {}) if tune_malloc() else None


def enable_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages, unless the user chose already.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` when it is unset and torch is not imported yet.

    Returns:
        Whether this process's torch uses huge pages: ``False`` when the user set another value,
        or when torch was imported before the call (it has read its setting already).
    """
    value = os.environ.get(HUGE_PAGES_ENV)
    if value is None:
        if "torch" in sys.modules:
            return False
        os.environ[HUGE_PAGES_ENV] = value = "1"
    return value.strip() == "1"


def huge_pages_for(setting: str) -> str:
    """The ``THP_MEM_ALLOC_ENABLE`` value for a fresh process with this allocator setting.

    ``"1"`` for ``tuned`` and ``"0"`` for ``system``, unless the user set the variable (then theirs).
    """
    if setting not in SETTINGS:
        raise ValueError(f"huge_pages_for: expected one of {', '.join(SETTINGS)}, got {setting!r}")
    if _USER_HUGE_PAGES is not None:
        return _USER_HUGE_PAGES
    return "1" if setting == "tuned" else "0"
