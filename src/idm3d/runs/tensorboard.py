"""TensorBoard logging of a training run: scalars from the metrics records, and mid-slice preview images.

Event files lie in the run folder itself, so ``tensorboard --logdir runs/`` lists every run by its folder
name. The package is optional (``pip install 'idm3d[tensorboard]'``): without it ``train.log.tensorboard``
null turns logging off with one info line, and ``true`` is a configuration error.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idm3d.errors import ConfigError

__all__ = ["NullBoard", "TensorBoardLog", "mid_slice_image", "tensorboard_available", "tensorboard_wanted"]

INSTALL_HINT = "pip install tensorboard (or idm3d[tensorboard])"
# metrics-record field -> TensorBoard tag
SCALARS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "step_time_s": "perf/step_time_s",
    "steps_per_s": "perf/steps_per_s",
    "mem_mb": "perf/memory_mib",
    "drift_max": "drift/max_error",
}


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (needed by ``torch.utils.tensorboard``) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_wanted(setting: bool | None) -> tuple[bool, str | None]:
    """``(log?, info line)`` for ``train.log.tensorboard``: null follows the package being installed.

    Raises:
        ConfigError: ``true`` without the package installed.
    """
    available = tensorboard_available()
    if setting is None:
        return available, None if available else f"idm3d: TensorBoard logging off (the package is not installed; "\
            f"{INSTALL_HINT})"
    if setting and not available:
        raise ConfigError(f"train.log.tensorboard: true, but the tensorboard package is not installed; {INSTALL_HINT}")
    return setting, None


def mid_slice_image(volume: Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """An (H, W) float image in [0, 1]: sagittal, coronal and axial mid-slices of an (X, Y, Z) volume, side by side.

    Slices are drawn as :func:`idm3d.inference.figures.save_mid_slices` draws them (superior/anterior up),
    each padded to the tallest one.
    """
    a = volume.detach().float().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume, np.float32)
    if a.ndim != 3:
        raise ValueError(f"volume: expected (X, Y, Z), got shape {a.shape}")
    x, y, z = (s // 2 for s in a.shape)
    slices = [np.flipud(s.T) for s in (a[x, :, :], a[:, y, :], a[:, :, z])]
    height = max(s.shape[0] for s in slices)
    lo, hi = value_range
    padded = [np.pad(s, ((0, height - s.shape[0]), (0, 1)), constant_values=lo) for s in slices]
    image = (np.concatenate(padded, axis=1) - lo) / (hi - lo)
    return np.clip(np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)  # a diverged sample: NaN black


class TensorBoardLog:
    """A ``SummaryWriter`` on a run folder.

    Args:
        log_dir: the run folder.
        purge_step: on resume, the step after the checkpoint's: events the interrupted run logged from it on are
            dropped by TensorBoard, as ``metrics.jsonl`` drops them.
    """

    enabled = True

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, record: Mapping[str, Any]) -> None:
        """Every known numeric field of a metrics record, and each op's drift error, at ``record["step"]``."""
        step = int(record["step"])
        for field, tag in SCALARS.items():
            value = record.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        for op, value in (record.get("drift") or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"drift/{op}", value, step)
        self.writer.flush()

    def images(self, volumes: Mapping[str, Tensor], step: int) -> None:
        """One ``preview/<name>`` image per (X, Y, Z) volume: its three mid-slices."""
        for name, volume in volumes.items():
            self.writer.add_image(f"preview/{name}", mid_slice_image(volume), step, dataformats="HW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NullBoard:
    """Logging off (not installed, ``train.log.tensorboard: false``, or a rank other than 0)."""

    enabled = False

    def scalars(self, record: Mapping[str, Any]) -> None:
        pass

    def images(self, volumes: Mapping[str, Tensor], step: int) -> None:
        pass

    def close(self) -> None:
        pass
