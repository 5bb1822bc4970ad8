"""Position channels: each voxel's coordinates in its whole volume, normalised to [-1, 1].

Patch Diffusion (Wang et al., NeurIPS 2023) and PatchDDM-3D (Bieder et al., MIDL 2023) give a network
trained on crops three extra input channels holding where each voxel lies in the whole volume, so that
a fully convolutional net trained on patches knows its position and can sample the whole grid in one
pass. Voxel ``i`` of an axis of ``n`` voxels has the coordinate ``-1 + 2 i / (n - 1)`` (0 when
``n == 1``): the first voxel is -1, the last +1, whatever the grid size.

A *position* says where a (patch) grid lies: a ``(B, 2, 3)`` integer tensor holding, per batch element,
the grid's lowest corner in the whole volume and the whole volume's shape. ``None`` means the grid is
the whole volume. :class:`~idm3d.diffusion.pipeline.DiffusionPipeline` appends these channels in
``model_input``; this module only computes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from idm3d.errors import ArgumentError

__all__ = ["COORDINATE_CHANNELS", "coordinate_channels", "position_of"]

COORDINATE_CHANNELS = 3


def position_of(corner: Sequence[int], extent: Sequence[int]) -> Tensor:
    """The ``(2, 3)`` position of a grid whose lowest corner is ``corner`` in a volume of shape ``extent``."""
    if len(corner) != 3 or len(extent) != 3:
        raise ArgumentError("position", f"expected 3 corner and 3 extent values, got {tuple(corner)}, {tuple(extent)}")
    return torch.tensor([list(map(int, corner)), list(map(int, extent))], dtype=torch.long)


def _axis(n_grid: int, start: Tensor, extent: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    index = start[:, None].to(device, dtype) + torch.arange(n_grid, device=device, dtype=dtype)[None]
    span = (extent.to(device, dtype) - 1).clamp_min(1)[:, None]
    return torch.where(extent[:, None].to(device) > 1, index / span * 2 - 1, torch.zeros_like(index))


def coordinate_channels(
    grid: Sequence[int],
    position: Tensor | None = None,
    *,
    batch: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``(B, 3, *grid)`` whole-volume coordinates of each voxel of a grid.

    Args:
        grid: the grid's spatial shape (X, Y, Z).
        position: ``(B, 2, 3)`` (or ``(2, 3)``, shared by the batch) lowest corner and whole-volume shape;
            ``None``: the grid is the whole volume.
        batch: batch size when ``position`` is ``None`` or ``(2, 3)``.
        device, dtype: of the result.

    Raises:
        ValueError: a position of the wrong shape, or a grid that leaves its whole volume.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3:
        raise ArgumentError("grid", f"expected 3 spatial sizes, got {grid}")
    if position is None:
        position = position_of((0, 0, 0), grid)
    position = torch.as_tensor(position, dtype=torch.long).cpu()
    if position.ndim == 2:
        position = position[None].expand(batch, 2, 3)
    if position.ndim != 3 or tuple(position.shape[1:]) != (2, 3):
        raise ArgumentError("position", f"expected shape (B, 2, 3) (corner, whole-volume shape), "
                         f"got {tuple(position.shape)}")
    corner, extent = position[:, 0], position[:, 1]
    size = torch.tensor(grid)
    if bool((corner < 0).any()) or bool((corner + size > extent).any()):
        raise ArgumentError("position", f"a {grid} grid at corners {corner.tolist()} leaves volumes {extent.tolist()}")
    device = torch.device("cpu") if device is None else torch.device(device)
    n = position.shape[0]
    axes = [_axis(grid[a], corner[:, a], extent[:, a], device, dtype) for a in range(3)]
    x = axes[0][:, :, None, None].expand(n, *grid)
    y = axes[1][:, None, :, None].expand(n, *grid)
    z = axes[2][:, None, None, :].expand(n, *grid)
    return torch.stack([x, y, z], dim=1).contiguous()
