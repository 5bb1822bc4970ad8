"""The demo's PNG previews: one held-out axial slice per image, and the loss curves of both runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["loss_figure", "preview_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _axial(volume: torch.Tensor | np.ndarray, z: int) -> np.ndarray:
    a = volume.detach().float().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume, dtype=np.float32)
    a = a[0] if a.ndim == 4 else a
    return a[:, :, z].T  # RAS (X, Y): x to the right, anterior up with origin="lower"


def preview_figure(
    images: Mapping[str, torch.Tensor],
    truth: str,
    predictions: Sequence[str],
    path: str | Path,
    z: int,
    title: str,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Axial slice ``z`` of every image (top row) and ``|prediction - truth|`` under each prediction.

    Args:
        images: label -> (X, Y, Z) or (1, X, Y, Z) volume, in display order.
        truth: label of the ground truth among ``images``.
        predictions: labels that get an absolute-error panel.
        path: the PNG to write (atomically).
        z: axial index within the volumes.
        title: figure title.
        value_range: grey-level range of the image row (the error row spans half of it).
    """
    plt = _pyplot()
    labels = list(images)
    fig, axes = plt.subplots(2, len(labels), figsize=(2.6 * len(labels) + 0.8, 5.6), dpi=100, squeeze=False,
                             layout="constrained")
    reference = _axial(images[truth], z)
    span = value_range[1] - value_range[0]
    for col, label in enumerate(labels):
        sl = _axial(images[label], z)
        ax = axes[0, col]
        ax.imshow(sl, origin="lower", cmap="gray", vmin=value_range[0], vmax=value_range[1], interpolation="nearest")
        ax.set_title(label, fontsize=9)
        err = axes[1, col]
        if label in predictions:
            shown = err.imshow(np.abs(sl - reference), origin="lower", cmap="magma", vmin=0.0, vmax=span / 2,
                               interpolation="nearest")
            err.set_title(f"|{label.split(' ')[0]} - truth|", fontsize=9)
        else:
            err.axis("off")
        for a in (ax, err):
            a.set_xticks([])
            a.set_yticks([])
    if predictions:
        fig.colorbar(shown, ax=axes[:, -1].tolist(), shrink=0.6, label="absolute error")
    fig.suptitle(title, fontsize=10)
    return _save(fig, Path(path))


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    # Trailing mean over up to ``window`` values: each logged loss is one random timestep's, so noisy.
    csum = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    counts = np.minimum(ends, window)
    return (csum[ends] - csum[ends - counts]) / counts


def loss_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str) -> Path:
    """Training loss of each run against step (left, raw and moving average) and training time (right), log scale."""
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for label, records in runs.items():
        rows = [r for r in records
                if isinstance(r.get("loss"), (int, float)) and r["loss"] > 0 and not r.get("skipped")]
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows], dtype=np.float64)
        losses = np.array([r["loss"] for r in rows], dtype=np.float64)
        smooth = _moving_average(losses, max(1, len(losses) // 15))
        marker = "o" if len(rows) < 20 else None  # a one- or two-point curve must still show
        (line,) = by_step.plot(steps, losses, lw=0.6, alpha=0.3)
        by_step.plot(steps, smooth, lw=1.6, color=line.get_color(), marker=marker, label=label)
        timed = np.array([isinstance(r.get("elapsed_s"), (int, float)) for r in rows])
        if timed.any():
            seconds = np.array([r["elapsed_s"] for r in rows if isinstance(r.get("elapsed_s"), (int, float))])
            by_time.plot(seconds, smooth[timed], lw=1.6, color=line.get_color(), marker=marker, label=label)
    for ax, xlabel in ((by_step, "step"), (by_time, "training time (s)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))
