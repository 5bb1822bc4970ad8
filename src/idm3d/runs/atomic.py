"""Atomic files: a temporary name in the same folder, flushed and fsynced, then ``os.replace`` and a folder fsync.

A crash or a full disk at any point leaves the previous file or the new one, never a torn one, and the
temporary file is removed when the write fails (the space comes back).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from safetensors.torch import save_file
from torch import Tensor

__all__ = ["TMP_MARK", "atomic_write_text", "fsync_dir", "save_tensors", "sha256"]

TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<pid>"
# Test hook: seconds to sleep between writing a temporary file and renaming it (crash-safety tests
# kill the process inside this window).
PAUSE_ENV = "IDM3D_CHECKPOINT_WRITE_PAUSE"


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename is durable only once its folder is)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _commit(tmp: Path, path: Path, checkpoint: bool) -> None:
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0) if checkpoint else 0.0
    if pause > 0:
        time.sleep(pause)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, *, checkpoint: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``).

    Args:
        path: the file.
        text: its whole content (UTF-8).
        checkpoint: a checkpoint's file (``IDM3D_CHECKPOINT_WRITE_PAUSE`` applies before its rename).
    """
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, path, checkpoint)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half file (and gets its space back)
        raise


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` to the safetensors file ``path`` atomically; the sha256 of the bytes on disk."""
    tmp = _tmp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
        # Hash what is on disk (and fsync it) rather than what we meant to write.
        with open(tmp, "rb+") as fh:
            digest = _hash_file(fh)
            os.fsync(fh.fileno())
        _commit(tmp, path, checkpoint=True)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half file (and gets its space back)
        raise
    return digest


def _hash_file(fh: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    """The hex sha256 of the file ``path``."""
    with open(path, "rb") as fh:
        return _hash_file(fh)
