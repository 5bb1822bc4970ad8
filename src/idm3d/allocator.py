"""CPU allocator setting: keep a process's resident memory near its live tensors.

PyTorch's CPU tensors come from glibc ``malloc``. By default glibc raises its mmap threshold to
the size of the largest block freed so far (up to 32 MiB), so after the first training step most
activation-sized blocks come from the heap, and freed heap memory stays resident: an IDMUNet
process at 64^3 grows by ~0.7-0.9 GiB over four steps that it never uses again
(``idm3d bench memory --malloc system``). Fixing the thresholds with ``mallopt`` (the same as
``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072``) makes every block over 128 KiB an
``mmap`` returned to the system when freed, and trims the heap top. It costs CPU time: the kernel
zero-fills fresh pages on each large allocation (~30% more CPU per IDMUNet step at 64^3 on 2 cores,
``idm3d bench memory --malloc tuned,system`` reports both), which a time-budgeted run pays in steps.
So it is opt-in: ``IDM3D_MALLOC=tuned`` makes the ``idm3d`` command apply it at start-up, for runs
whose limit is memory; the default ``system`` keeps glibc's behaviour. The benchmarks' memory rows
set ``tuned`` explicitly (their ``--malloc`` option).
Off glibc (macOS, musl) this is a no-op.

Huge pages (part of ``tuned``): every fresh tensor's pages are faulted in by the kernel on first
touch, one fault per 4 KiB page, and under ``tuned`` every block over 128 KiB is fresh. At 256^3 a
feature map is 1-2 GiB, and ~40% of a memory-efficient IDMUNet step's CPU time was system time in
those faults. ``THP_MEM_ALLOC_ENABLE=1``, PyTorch's own switch, makes its CPU allocator align blocks
of 2 MiB and more to 2 MiB and ask for transparent huge pages (``madvise``): one fault per 2 MiB.
The 256^3 step took 561 instead of 709 CPU-s with the same peak. With glibc's default heap the
same switch made the 64^3 step slower (6.4 against 5.3 CPU-s: the heap reuses its pages, so there
are few faults to save), so ``system`` leaves it off (docs/bench/README.md). PyTorch reads the
variable once, when it is imported, so the command line applies ``IDM3D_MALLOC`` before anything
imports torch, and the benchmarks start each child with the variable its setting implies
(:func:`huge_pages_for`). A value the user set is always kept. Where the kernel's THP mode is
``never`` it changes nothing.
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
