"""The trivial reference of the demo: a linear T1 -> T2 intensity map fitted by least squares.

It is the floor a learned translation must beat: one slope and one offset, fitted on the training
slabs inside the brain mask and applied inside the mask of the held-out band. Voxels outside the mask
keep the background intensity of the training target, so the reference is handed the brain mask at test
time (which the networks never see): if anything, a generous floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from idm3d.errors import DataError

__all__ = ["LinearMap", "fit_linear_map"]


@dataclass(frozen=True)
class LinearMap:
    """``target = slope * source + offset`` inside the mask, ``background`` outside, clipped to ``[lo, hi]``."""

    slope: float
    offset: float
    background: float
    voxels: int
    lo: float = -1.0
    hi: float = 1.0

    def __call__(self, source: Tensor, mask: Tensor) -> Tensor:
        """Apply the map to a source volume; ``mask`` (bool, same spatial shape) selects the brain."""
        if source.shape[-3:] != mask.shape[-3:]:
            raise DataError(f"linear map: mask shape {tuple(mask.shape)} does not match source {tuple(source.shape)}")
        inside = (self.slope * source.float() + self.offset).clamp(self.lo, self.hi)
        return torch.where(mask.bool(), inside, torch.full_like(inside, self.background))


def fit_linear_map(source: Tensor, target: Tensor, mask: Tensor, lo: float = -1.0, hi: float = 1.0) -> LinearMap:
    """Least-squares fit of ``target ~ slope * source + offset`` over the voxels of ``mask``.

    Args:
        source: source volume (e.g. the T1 training slabs), any shape.
        target: target volume of the same shape.
        mask: bool volume of the same shape; the fit uses its voxels, the background value is the median
            target intensity outside it.
        lo, hi: the intensity range predictions are clipped to.

    Raises:
        DataError: shapes differ, too few mask voxels, or a constant source.
    """
    if source.shape != target.shape or source.shape != mask.shape:
        raise DataError(
            f"linear map: source {tuple(source.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} "
            "must have the same shape"
        )
    m = mask.bool()
    x, y = source[m].double(), target[m].double()
    if x.numel() < 2 or float(x.std()) == 0.0:
        raise DataError(f"linear map: needs at least 2 mask voxels with varying source intensity, got {x.numel()}")
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    slope, offset = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    outside = target[~m]
    background = float(outside.median()) if outside.numel() else lo
    return LinearMap(float(slope), float(offset), background, int(x.numel()), lo, hi)
