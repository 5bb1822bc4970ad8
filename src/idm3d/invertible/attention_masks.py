"""3D checkerboard masks for the invertible attention: which entries pass, which get transformed.

Voxel ``(d, h, w)`` has *parity* ``(d + h + w) % 2``. An entry ``(c, d, h, w)`` passes through
unchanged when

* ``channel_alternating=False``: its voxel has parity 0 (every channel of that voxel passes);
* ``channel_alternating=True``: ``(c + d + h + w) % 2 == 0`` (even channels pass at parity-0
  voxels, odd channels at parity-1 voxels).

Counts: a grid of ``N = D*H*W`` voxels has ``ceil(N/2)`` parity-0 and ``floor(N/2)`` parity-1
voxels (they differ only when D, H and W are all odd: the corner ``(0, 0, 0)`` has parity 0). So
without channel alternation ``C*ceil(N/2)`` entries pass and ``C*floor(N/2)`` are transformed; with
it, ``ceil(C/2)*ceil(N/2) + floor(C/2)*floor(N/2)`` pass. For even sizes both halves are equal.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["VoxelSplit", "pass_mask", "pass_table", "passing_entries", "voxel_parity", "voxel_split"]

Shape3 = tuple[int, int, int]


def _shape3(spatial) -> Shape3:
    return tuple(int(s) for s in spatial)  # type: ignore[return-value]


@lru_cache(maxsize=32)
def _parity_cached(spatial: Shape3, device: torch.device) -> Tensor:
    d, h, w = (torch.arange(s, device=device) for s in spatial)
    return ((d[:, None, None] + h[None, :, None] + w[None, None, :]) % 2).bool()


def voxel_parity(spatial, device: torch.device | str | None = None) -> Tensor:
    """``(d + h + w) % 2 == 1`` as a ``(D, H, W)`` bool tensor (cached: do not modify it)."""
    return _parity_cached(_shape3(spatial), torch.device(device or "cpu"))


class VoxelSplit(NamedTuple):
    """Flat voxel indices of each parity and the permutation that undoes ``cat(index0, index1)``."""

    index: tuple[Tensor, Tensor]
    restore: Tensor

    @property
    def counts(self) -> tuple[int, int]:
        return int(self.index[0].numel()), int(self.index[1].numel())


@lru_cache(maxsize=32)
def _split_cached(spatial: Shape3, device: torch.device) -> VoxelSplit:
    parity = _parity_cached(spatial, device).flatten()
    idx0 = torch.nonzero(~parity).flatten()
    idx1 = torch.nonzero(parity).flatten()
    return VoxelSplit((idx0, idx1), torch.argsort(torch.cat((idx0, idx1))))


def voxel_split(spatial, device: torch.device | str | None = None) -> VoxelSplit:
    """Flat indices of the parity-0 and parity-1 voxels of a ``D x H x W`` grid (cached)."""
    return _split_cached(_shape3(spatial), torch.device(device or "cpu"))


def pass_table(channels: int, channel_alternating: bool, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``(2, C)``: entry ``[p, c]`` is True when channel ``c`` passes at parity-``p`` voxels."""
    c = torch.arange(channels, device=device)
    if channel_alternating:
        return torch.stack(((c % 2) == 0, (c % 2) == 1))
    return torch.stack((torch.ones_like(c, dtype=torch.bool), torch.zeros_like(c, dtype=torch.bool)))


def passing_entries(
    channels: int, spatial, channel_alternating: bool, device: torch.device | str | None = None
) -> Tensor:
    """Bool mask of the passing entries, broadcastable against ``(B, C, D, H, W)``.

    ``(D, H, W)`` without channel alternation (shared by all channels), else ``(C, D, H, W)``.
    """
    odd_voxel = voxel_parity(spatial, device)
    if not channel_alternating:
        return ~odd_voxel
    odd_channel = (torch.arange(channels, device=odd_voxel.device) % 2).bool()
    return odd_channel[:, None, None, None] == odd_voxel


def pass_mask(
    channels: int,
    spatial,
    channel_alternating: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The mask ``M`` of shape ``(C, D, H, W)``: 1 where an entry passes unchanged, 0 elsewhere."""
    mask = passing_entries(channels, spatial, channel_alternating, device)
    return mask.to(dtype).expand(channels, *_shape3(spatial)).clone()
