"""The spatial variant of :class:`~idm3d.invertible.attention.InvertibleAttention3d`.

Tokens are the voxels of one parity; ``T_p`` is ``n_p x n_p`` per head and acts on the voxel axis
of the head's transformed channels; see the attention module's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from idm3d.invertible import linalg
from idm3d.invertible.attention import Gains, InvertibleAttention3d
from idm3d.invertible.attention_masks import VoxelSplit
from idm3d.invertible.base import BackwardResult, grad_parameters

__all__ = ["SpatialAttention3d"]

# (voxel parity, T_p) for each parity that has transformed entries; T_p is (B, heads, n_p, n_p).
Matrices = list[tuple[int, Tensor]]


class SpatialAttention3d(InvertibleAttention3d):
    """Invertible attention over voxels (``variant="spatial"``), up to ``max_tokens`` voxels.

    Takes the arguments of :class:`~idm3d.invertible.attention.InvertibleAttention3d` (``variant``
    may be omitted).
    """

    variant = "spatial"

    def _key_width(self) -> int:
        return self.heads * self.key_dim

    def _check_grid(self, spatial: tuple[int, ...]) -> None:
        n = math.prod(spatial)
        if n > self.max_tokens:
            raise ValueError(
                f"{type(self).__name__}(variant='spatial'): {spatial[0]}x{spatial[1]}x{spatial[2]} = {n} voxels "
                f"exceeds max_tokens={self.max_tokens}; use variant='channel' here or raise max_tokens"
            )

    def _matrices(self, x: Tensor, gains: Gains, split: VoxelSplit, passing: Tensor) -> Matrices:
        """``T_p`` (B, heads, n_p, n_p) over the parity-``p`` voxels, from ``x * M`` only."""
        b, h = x.shape[0], self.heads
        x1 = torch.where(passing, x, 0.0)
        # Explicit zero padding: avg_pool3d's own padding refuses grids smaller than the kernel.
        feats_all = F.avg_pool3d(F.pad(x1, (1, 1, 1, 1, 1, 1)), kernel_size=3, stride=1).flatten(2)
        wq, wk = self._weights(gains)
        tau = self.temperature.to(x.dtype).view(1, h, 1, 1) / math.sqrt(self.key_dim)
        mats: Matrices = []
        for p in (0, 1):
            n = split.counts[p]
            if not self._moves_any[p] or n == 0:
                continue
            feats = feats_all[..., split.index[p]]
            q = (wq @ feats).view(b, h, self.key_dim, n) * tau  # scale the small factor, not the n x n product
            k = (wk @ feats).view(b, h, self.key_dim, n)
            mats.append((p, self._shifted(torch.softmax(q.mT @ k, dim=-1))))
        return mats

    def _map(self, x: Tensor, mats: Matrices, split: VoxelSplit, inverse: bool) -> Tensor:
        """Apply every ``T_p`` on the voxel axis (or ``T_p^-1``)."""
        b, c = x.shape[:2]
        flat = x.flatten(2)
        parts = [flat[..., split.index[0]], flat[..., split.index[1]]]
        for p, t in mats:
            xs = parts[p].view(b, self.heads, self.head_dim, -1)
            ys = linalg.solve(t, xs.mT).mT if inverse else xs @ t.mT
            if not self._moves_all[p]:
                ys = torch.where(self._moving[p][None, :, :, None], ys, xs)
            parts[p] = ys.reshape(b, c, -1)
        return torch.cat(parts, dim=2)[..., split.restore].view_as(x)

    def _forward_map(self, x: Tensor, mats: Matrices, split: VoxelSplit, passing: Tensor) -> Tensor:
        return self._map(x, mats, split, inverse=False)

    def _inverse_map(self, y: Tensor, mats: Matrices, split: VoxelSplit, passing: Tensor) -> Tensor:
        return self._map(y, mats, split, inverse=True)

    def _log_det(self, x: Tensor, mats: Matrices, split: VoxelSplit) -> Tensor:
        out = x.new_zeros(x.shape[0])
        for p, t in mats:
            # one T_p per head, acting on each of the head's moving channels
            moving = self._moving[p].sum(-1).to(x.dtype)
            out = out + (linalg.logabsdet(t) * moving).sum(-1)
        return out

    def _backward(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        # x1 == y1, so the matrices built from y with a graph are those of the forward: build them
        # once, invert with their values, then replay only the product T x2 with a graph.
        src = y.requires_grad_(True)
        params = grad_parameters(self)
        wanted_cond = [c for c in cond if c.requires_grad]
        with torch.enable_grad():
            gains, split, passing = self._prepare(src, cond)
            mats = self._matrices(src, gains, split, passing)
        with torch.no_grad():
            x = self._inverse_map(y, [(p, t.detach()) for p, t in mats], split, passing)
        x.requires_grad_(True)
        with torch.enable_grad():
            y_graph = self._forward_map(x, mats, split, passing)
        grads = torch.autograd.grad(y_graph, [x, src, *wanted_cond, *params], grad_y, allow_unused=True)
        # src only feeds the matrices through x * M: its gradient is the x1 part of dL/dx via A.
        grad_x = grads[0] if grads[1] is None else grads[0] + grads[1]
        cond_iter = iter(grads[2 : 2 + len(wanted_cond)])
        grad_cond = [next(cond_iter) if c.requires_grad else None for c in cond]
        return x.detach(), grad_x, grad_cond, list(grads[2 + len(wanted_cond) :])
