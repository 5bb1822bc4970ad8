"""The invertible attentions on depth shards.

Channel attention: its ``C x C`` matrices come from the Gram matrix ``x1 x1^T`` of the passing half,
a sum over voxels: each rank sums its slices and one all-reduce makes it replicated
(:func:`~idm3d.domain.comm.all_reduce_sum`, whose backward all-reduces the Gram's partial gradient).
The map ``T`` then acts voxel by voxel, locally. The checkerboard's parity is the global voxel's:
a shard starting at an odd depth flips it. A memory-efficient segment's forward keeps the summed Gram
in its node (:mod:`idm3d.invertible.record`); the rebuild in backward starts from it (no local sum,
no all-reduce) and only the Gram's gradient is all-reduced (:func:`~idm3d.domain.comm.grad_sum`).

Spatial attention: ``T`` couples all voxels of a (small, low-resolution) map, so each rank gathers the
whole map, runs the unsharded module on it (replicated, bitwise the same on every rank) and keeps its
slices. In the memory-efficient backward the output's gradient is gathered (each rank's gradient is
the total one of its slices, so the gathered one is the total gradient of the map), the unsharded
backward runs replicated and its parameter and conditioning gradients count once: rank 0's (the
other ranks return zeros, so the step's gradient sum is exact). Its input is the whole map the
forward gathered and kept in the segment's node, so the rebuild neither gathers the output nor
solves for the input; outside a segment's rebuild the output is gathered and inverted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from idm3d.domain.comm import all_reduce_sum, domain_of, gather_full, gather_list, grad_sum, local_slices
from idm3d.invertible.attention import Gains
from idm3d.invertible.attention_channel import ChannelAttention3d
from idm3d.invertible.attention_masks import VoxelSplit
from idm3d.invertible.attention_spatial import SpatialAttention3d
from idm3d.invertible.base import BackwardResult
from idm3d.invertible.record import keep, replayed

__all__ = ["DomainChannelAttention3d", "DomainSpatialAttention3d"]


def _swapped(split: VoxelSplit) -> VoxelSplit:
    """The split with parities 0 and 1 exchanged (a shard that starts at an odd global depth)."""
    index = (split.index[1], split.index[0])
    return VoxelSplit(index, torch.argsort(torch.cat(index)))


class DomainChannelAttention3d(ChannelAttention3d):
    """:class:`~idm3d.invertible.ChannelAttention3d` on depth shards (same parameters and state dict)."""

    _domain_key: int

    def _prepare(self, x: Tensor, cond: Sequence[Tensor]) -> tuple[Gains, VoxelSplit, Tensor]:
        gains, split, passing = super()._prepare(x, cond)
        if domain_of(self._domain_key).offset(x.shape[2]) % 2:
            # parity of the global (d + h + w): for either mask, an odd depth offset negates the table
            return gains, _swapped(split), ~passing
        return gains, split, passing

    def _passing_gram(self, x: Tensor, passing: Tensor) -> Tensor:
        kept = replayed(self)
        # a rebuild (the analytic backward, which carries dL/dG to x itself): the volume's Gram from
        # forward, a fresh tensor over it; a graph through x (the module called inside another
        # sub-network's rebuild) needs the local sum
        if kept is not None and not (torch.is_grad_enabled() and x.requires_grad):
            return kept.detach()
        return super()._passing_gram(x, passing)

    def _from_gram(self, gram: Tensor, gains: Gains) -> Tensor:
        kept = replayed(self)
        if kept is not None and gram.data_ptr() == kept.data_ptr():
            # the volume's Gram already (from _passing_gram): only its gradient is summed
            return super()._from_gram(grad_sum(gram, self._domain_key), gains)
        # this rank's sum over its voxels -> the volume's; the backward sums the partial dL/dG
        total = all_reduce_sum(gram, self._domain_key, "stats")
        keep(self, total.detach())
        return super()._from_gram(total, gains)


class DomainSpatialAttention3d(SpatialAttention3d):
    """:class:`~idm3d.invertible.SpatialAttention3d` on depth shards: gathered, solved replicated, sliced."""

    _domain_key: int

    def _full(self, t: Tensor) -> Tensor:
        if torch.is_grad_enabled() and t.requires_grad:
            return gather_full(t, self._domain_key)  # backward: partial gradients summed, slices kept
        return torch.cat(gather_list(t.detach(), domain_of(self._domain_key), "stats"), dim=2)

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        x_full = self._full(x)
        keep(self, x_full.detach())  # in a segment's forward: the rebuild's input, kept in its node
        return local_slices(super().forward(x_full, *cond), domain_of(self._domain_key))

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        return local_slices(super().inverse(self._full(y), *cond), domain_of(self._domain_key))

    def log_det(self, x: Tensor, *cond: Tensor) -> Tensor:
        """The whole map's ``log|det|`` (the same on every rank)."""
        return super().log_det(self._full(x), *cond)

    def backward_pass(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        domain = domain_of(self._domain_key)
        x_full = replayed(self)
        g_full = torch.cat(gather_list(grad_y.contiguous(), domain), dim=2)
        if x_full is not None:  # the forward's whole input: no gather of y, no solve
            x, grad_x, grad_cond, grad_params = self.backward_at(x_full, g_full, cond)
        else:
            y_full = torch.cat(gather_list(y.detach(), domain, "stats"), dim=2)
            x, grad_x, grad_cond, grad_params = super().backward_pass(y_full, g_full, cond)
        if domain.rank:
            # replicated work with the total gradient: count its parameter and conditioning share once
            grad_cond = [None if g is None else torch.zeros_like(g) for g in grad_cond]
            grad_params = [None if g is None else torch.zeros_like(g) for g in grad_params]
        return local_slices(x, domain).contiguous(), local_slices(grad_x, domain).contiguous(), grad_cond, grad_params
