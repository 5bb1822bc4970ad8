"""Quick-look figures: the three orthogonal mid-slices of one or more volumes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from idm3d.runs.logs import save_figure

__all__ = ["save_mid_slices"]


def save_mid_slices(
    volumes: Mapping[str, np.ndarray | torch.Tensor],
    path: str | Path,
    title: str | None = None,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
) -> Path:
    """Write a PNG: one row per volume, columns sagittal / coronal / axial through the volume centre.

    Volumes are (X, Y, Z) on RAS voxel axes (as the preprocessing leaves them), drawn with superior and
    anterior up.

    Args:
        volumes: row label -> (X, Y, Z) array (a leading singleton channel is dropped).
        path: the PNG to write (atomically).
        title: figure title.
        value_range: fixed grey-level range, or ``None`` for each row's own min/max.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {}
    for name, v in volumes.items():
        a = v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.asarray(v, dtype=np.float32)
        arrays[name] = a[0] if a.ndim == 4 and a.shape[0] == 1 else a
    fig, axes = plt.subplots(len(arrays), 3, figsize=(9, 3 * len(arrays)), dpi=100, squeeze=False)
    for row, (name, a) in enumerate(arrays.items()):
        x, y, z = (s // 2 for s in a.shape)
        vmin, vmax = value_range if value_range is not None else (float(a.min()), float(a.max()))
        for col, (label, sl) in enumerate(
            (("sagittal", a[x, :, :]), ("coronal", a[:, y, :]), ("axial", a[:, :, z]))
        ):
            ax = axes[row, col]
            ax.imshow(sl.T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label)
            if col == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
