"""Image-similarity metrics for synthesised volumes: PSNR, 3D SSIM and MAE, built on MONAI's metrics.

Conventions:

* ``data_range`` is explicit: images scaled to [-1, 1] have ``data_range=2.0`` (the default).
* PSNR of identical volumes is ``inf`` (MSE = 0); JSON writers must handle it (``json`` writes ``Infinity``).
* SSIM uses MONAI's Gaussian window (11 voxels, sigma 1.5, k1=0.01, k2=0.03) without padding, so the SSIM
  map covers voxels whose whole window is inside the volume. Axes shorter than 11 voxels use the largest
  odd window that fits.
* Masked metrics: PSNR and MAE use the mask's voxels only. Masked SSIM averages the SSIM map over mask
  voxels; each map value still sees its window, so it depends on voxels up to 5 voxels (half a window)
  outside the mask, as in the usual "SSIM inside the brain" reporting.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs

__all__ = ["evaluate_pair", "mae", "psnr", "ssim", "ssim_map", "ssim_window"]

ArrayLike = torch.Tensor | np.ndarray

WIN_SIZE = 11
KERNEL_SIGMA = 1.5


def _as_5d(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().float().cpu()
    if t.ndim == 3:
        t = t[None, None]
    elif t.ndim == 4:
        t = t[None]
    if t.ndim != 5:
        raise ValueError(
            f"{name}: expected a 3D volume (X, Y, Z), (C, X, Y, Z) or (B, C, X, Y, Z), got {tuple(t.shape)}"
        )
    return t


def _prepare(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None, data_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    p, t = _as_5d(pred, "pred"), _as_5d(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if not (isinstance(data_range, (int, float)) and data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"data_range: expected a positive number (2.0 for images in [-1, 1]), got {data_range!r}")
    m = None
    if mask is not None:
        m = _as_5d(mask, "mask").bool()
        if m.shape[2:] != p.shape[2:]:
            raise ValueError(f"mask: spatial shape {tuple(m.shape[2:])} differs from the images' {tuple(p.shape[2:])}")
        m = m.expand_as(p)
        if not bool(m.any()):
            raise ValueError("mask: is empty; masked metrics need at least one voxel")
    return p, t, m


def _flat(p: torch.Tensor, t: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # MONAI's regression metrics reduce over every dim but the first; (1, N) vectors give one value.
    if m is None:
        return p.reshape(1, -1), t.reshape(1, -1)
    return p[m].reshape(1, -1), t[m].reshape(1, -1)


def psnr(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, ``20 log10(data_range) - 10 log10(MSE)`` (inf when equal)."""
    p, t, m = _prepare(pred, target, mask, data_range)
    return float(PSNRMetric(max_val=data_range)(*_flat(p, t, m)).item())


def mae(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, data_range: float = 2.0) -> float:
    """Mean absolute error, over all voxels or the mask's (``data_range`` only validated)."""
    p, t, m = _prepare(pred, target, mask, data_range)
    return float(MAEMetric()(*_flat(p, t, m)).item())


def ssim_window(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The SSIM window per axis for a volume of ``shape`` (X, Y, Z): 11, or the largest odd size that fits."""
    return tuple(min(WIN_SIZE, s if s % 2 else s - 1) for s in shape)


def ssim_map(pred: ArrayLike, target: ArrayLike, data_range: float = 2.0) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Local 3D SSIM map (B, C, X-w+1, Y-w+1, Z-w+1) from MONAI, and the window size used per axis."""
    p, t, _ = _prepare(pred, target, None, data_range)
    win = ssim_window(tuple(p.shape[2:]))
    if min(win) < 1:
        raise ValueError(f"ssim: volume {tuple(p.shape[2:])} is too small for a window")
    value, _ = compute_ssim_and_cs(
        p, t, spatial_dims=3, kernel_size=win, kernel_sigma=[KERNEL_SIGMA] * 3, data_range=data_range
    )
    return value, win


def ssim(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, data_range: float = 2.0) -> float:
    """Mean 3D SSIM over the volume, or over the mask voxels of the SSIM map (see module notes)."""
    p, t, m = _prepare(pred, target, mask, data_range)
    value, win = ssim_map(p, t, data_range)
    if m is None:
        return float(value.mean().item())
    # The map lacks (w-1)/2 voxels at each border (no padding): crop the mask to match.
    index = tuple(slice((w - 1) // 2, (w - 1) // 2 + n) for w, n in zip(win, value.shape[2:]))
    inner = m[(Ellipsis, *index)]
    if not bool(inner.any()):
        raise ValueError(f"mask: no voxel lies at least {(max(win) - 1) // 2} voxels inside the volume border")
    return float(value[inner].mean().item())


def evaluate_pair(
    pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None, data_range: float = 2.0
) -> dict[str, float]:
    """PSNR, SSIM and MAE of a prediction against its target, whole-volume and (given a mask) masked.

    Args:
        pred: (X, Y, Z), (C, X, Y, Z) or (B, C, X, Y, Z) tensor or array.
        target: same shape as ``pred``.
        mask: optional bool volume on the same spatial grid (e.g. the brain mask).
        data_range: max - min of the intensity scale (2.0 for [-1, 1]).

    A batch (B > 1) is pooled into one value per metric; call once per case for per-case numbers.

    Returns:
        ``{"psnr", "ssim", "mae"}`` plus ``{"psnr_mask", "ssim_mask", "mae_mask"}`` when ``mask`` is given.
    """
    out = {
        "psnr": psnr(pred, target, None, data_range),
        "ssim": ssim(pred, target, None, data_range),
        "mae": mae(pred, target, None, data_range),
    }
    if mask is not None:
        out.update(
            {
                "psnr_mask": psnr(pred, target, mask, data_range),
                "ssim_mask": ssim(pred, target, mask, data_range),
                "mae_mask": mae(pred, target, mask, data_range),
            }
        )
    return out
