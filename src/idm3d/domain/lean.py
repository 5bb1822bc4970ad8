"""The lean no-grad forward on depth shards: the single-process in-place path, fed by the neighbours.

Sampling calls the network without a graph, where one process runs IDMUNet's in-place path
(:mod:`idm3d.invertible.inplace`): the stem's output is the one full-resolution buffer, couplings add
into it, large sub-networks, stem and head run in depth slabs. A sharded twin (:func:`sharded_twin`)
carries hooks (its gradient sum, the shard-depth check), which send a call down the ordinary path,
several full-size maps per rank. :class:`LeanShardedNet` runs the in-place path on a rank's slices
instead. Rank-local there: coupling updates, channel splits and joins, the orthogonal 2x2x2
resampling (a shard's depth is a multiple of every level's 2). Global, through
:class:`ShardNeighbours` (set as the primitives' :func:`~idm3d.invertible.inplace.depth_neighbours`):

* GroupNorm statistics of a slab-path sub-network: each rank's per-group ``(mean, m2)`` (float64),
  all-gathered and combined in rank order (Chan's pairwise update, as the slabs of one process are);
* the ``kernel // 2`` planes a 3x3x3 convolution reads beyond a shard's end: its input's (or its
  hidden map's) boundary planes, swapped with the neighbours (:func:`~idm3d.domain.comm.exchange_halos`),
  normalised like the rank's own; zeros only at the volume's ends, as one process pads.

A sub-network, stem or head small enough to run whole calls its modules, which are the sharded ones
(halo convolutions, sharded GroupNorms), and the attentions run as modules too (the channel
attention's Gram all-reduced, the spatial attention's map gathered): those need nothing here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from idm3d.domain.comm import Domain, exchange_halos, gather_list
from idm3d.domain.shard import check_shard_depth, shard
from idm3d.domain.twin import shared_copy
from idm3d.invertible.inplace import DepthNeighbours, Edges, depth_neighbours

__all__ = ["LeanShardedNet", "ShardNeighbours"]


class ShardNeighbours(DepthNeighbours):
    """:class:`~idm3d.invertible.inplace.DepthNeighbours` over a domain's ranks (each call a collective)."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def combine(self, mean: Tensor, m2: Tensor, count: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
        """The volume's moments from every rank's (equal ``count``), combined in rank order on every rank."""
        if self.domain.size == 1:
            return mean, m2, count
        # NCCL moves only device tensors; the moments live on the CPU
        where = device if device.type != "cpu" else torch.device("cpu")
        parts = gather_list(torch.stack((mean, m2)).to(where), self.domain, "stats")
        total_mean, total_m2, n = parts[0][0].cpu().clone(), parts[0][1].cpu().clone(), count
        for part in parts[1:]:
            part = part.cpu()
            delta = part[0] - total_mean
            total = n + count
            total_mean += delta * (count / total)
            total_m2 += part[1] + delta.square() * (n * count / total)
            n = total
        return total_mean, total_m2, n

    def exchange(self, first: Tensor, last: Tensor) -> Edges:
        """The previous rank's last planes and the next rank's first (``None`` at the volume's ends)."""
        return exchange_halos(first, last, self.domain)


class LeanShardedNet(nn.Module):
    """A depth-sharded network for no-grad calls that takes the in-place path on each rank's slices.

    Args:
        model: the unsharded network (an IDMUNet); its parameters are shared, not copied.
        group: the domain's process group (``None``: the world).

    ``net(x_shard, t, ...)`` on every rank returns that rank's slices of ``model(x, t, ...)``. Calls
    with gradients enabled are refused (training uses :func:`~idm3d.domain.twin.sharded_twin`).
    """

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        super().__init__()
        net = shard(shared_copy(model), group)
        hook = net.__dict__.pop("_domain_hook", None)
        if hook is not None:  # checked in forward instead: a hook would turn the in-place path off
            hook.remove()
        self.net = net
        self.source = [model]  # a list: not a submodule (its parameters are the net's)
        self.domain = Domain.of(group)
        self.neighbours = ShardNeighbours(self.domain)
        self.size_multiple = int(getattr(model, "size_multiple", 1))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("LeanShardedNet: no-grad calls only; train through idm3d.domain.twin.sharded_twin")
        if self.net.training != self.source[0].training:  # model.train() / eval() apply here too
            self.net.train(self.source[0].training)
        check_shard_depth(x.shape[2], self.domain.size, self.size_multiple)
        with depth_neighbours(self.neighbours):
            return self.net(x, *args, **kwargs)
