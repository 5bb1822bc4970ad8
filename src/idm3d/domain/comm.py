"""The collectives of depth sharding: who holds which slices, halo exchange, reductions, a byte counter.

A *domain* is a process group whose ranks split every feature map along depth: rank ``r`` of ``R``
holds slices ``[r * d, (r + 1) * d)`` of a map of depth ``R * d`` at every resolution level. Tensors
come in two kinds, and their gradients follow two rules (what keeps the backward exact):

* **sharded** maps (B, C, d, H, W): the gradient a rank holds is the *total* gradient of its slices
  (the adjoint of every halo exchange has already added the neighbours' contributions);
* **replicated** values (the timestep embedding, GroupNorm statistics, the channel attention's
  C x C matrices, the parameters): every rank holds the same value and a *partial* gradient, its own
  slices' contribution. Sums of partials are taken where a replicated value meets a sharded one (the
  backward of :func:`all_reduce_sum`) and, once per step, over the parameters' gradients
  (:func:`~idm3d.domain.shard.sync_gradients`).

Every rank runs the same sequence of collectives (the same modules in the same order), so point-to-
point halos and reductions always pair up; nothing here branches on data.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CALLS",
    "COUNTER",
    "Domain",
    "all_reduce_sum",
    "domain_of",
    "exchange_halos",
    "gather_depth",
    "grad_sum",
    "register",
    "scatter_depth",
]

# Bytes this process sent, by kind: what the tests compare with the figures stated from the shapes.
# "halo": halo planes (forward and the adjoint in backward); "stats": the forward's replicated values
# made from sharded ones (GroupNorm statistics, the channel attention's Gram, the spatial attention's
# gathered map), which a memory-efficient rebuild replays instead of sending again; "reduce" and
# "gather": the backward's sums and gathers of gradients; "grads": the parameters' gradient sum.
# Reset it with COUNTER.clear().
COUNTER: Counter[str] = Counter()
# The number of collectives by the same kinds (a halo exchange counts once). Reset with CALLS.clear().
CALLS: Counter[str] = Counter()


@dataclass(frozen=True)
class Domain:
    """A depth-sharding group as one rank sees it.

    Args:
        group: the process group (``None``: the default, world group).
        rank: this process's rank in ``group``.
        size: number of ranks ``R``.
    """

    group: Any
    rank: int
    size: int

    @classmethod
    def of(cls, group: Any = None) -> Domain:
        """The :class:`Domain` of ``group`` for the calling process (the world group when ``None``)."""
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def offset(self, depth: int) -> int:
        """Global index of this rank's first slice, for a local depth ``depth``."""
        return self.rank * depth


# Domain modules keep an integer key, not the group: a ProcessGroup cannot be deep-copied or pickled,
# and an EMA or checkpoint copy of a sharded model must still work.
_DOMAINS: dict[int, Domain] = {}
_KEYS = itertools.count()


def register(domain: Domain) -> int:
    """Store ``domain``; the key domain modules look it up by."""
    key = next(_KEYS)
    _DOMAINS[key] = domain
    return key


def domain_of(key: int) -> Domain:
    """The domain registered under ``key``."""
    return _DOMAINS[key]


def _count(kind: str, t: Tensor, times: int = 1) -> None:
    COUNTER[kind] += t.numel() * t.element_size() * times


def exchange_halos(lo: Tensor, hi: Tensor, domain: Domain) -> tuple[Tensor | None, Tensor | None]:
    """Send ``lo`` to the previous rank and ``hi`` to the next; return (what the previous sent, the next).

    ``None`` stands for the global volume's ends (the first rank has no previous, the last no next).
    Both directions are posted at once (non-blocking), so no ordering between ranks can deadlock.
    """
    ops, from_prev, from_next = [], None, None
    if domain.rank > 0:
        from_prev = torch.empty_like(lo, memory_format=torch.contiguous_format)
        ops += [dist.P2POp(dist.isend, lo.contiguous(), group=domain.group, group_peer=domain.rank - 1),
                dist.P2POp(dist.irecv, from_prev, group=domain.group, group_peer=domain.rank - 1)]
        _count("halo", lo)
    if domain.rank < domain.size - 1:
        from_next = torch.empty_like(hi, memory_format=torch.contiguous_format)
        ops += [dist.P2POp(dist.isend, hi.contiguous(), group=domain.group, group_peer=domain.rank + 1),
                dist.P2POp(dist.irecv, from_next, group=domain.group, group_peer=domain.rank + 1)]
        _count("halo", hi)
    if ops:
        CALLS["halo"] += 1
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return from_prev, from_next


def reduce_(t: Tensor, domain: Domain, kind: str = "reduce") -> Tensor:
    """In-place sum of ``t`` over the domain (a plain collective, not recorded by autograd)."""
    if domain.size > 1:
        _count(kind, t)
        CALLS[kind] += 1
        dist.all_reduce(t, group=domain.group)
    return t


def gather_list(t: Tensor, domain: Domain, kind: str = "gather") -> list[Tensor]:
    """Every rank's ``t`` (same shape everywhere), in rank order."""
    if domain.size == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(domain.size)]
    _count(kind, t)
    CALLS[kind] += 1
    dist.all_gather(out, t, group=domain.group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """Replicated sum of partial values; its backward sums the partial gradients (the same collective)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, key: int, kind: str) -> Tensor:  # type: ignore[override]
        ctx.key = key
        return reduce_(t.clone(), domain_of(key), kind)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return reduce_(grad.clone(), domain_of(ctx.key)), None, None


def all_reduce_sum(t: Tensor, key: int, kind: str = "reduce") -> Tensor:
    """``sum over ranks of t``, differentiable: a sharded value's partial sums made replicated.

    Args:
        t: this rank's partial value.
        key: the registered domain.
        kind: the forward's counter kind (the backward's is ``"reduce"``).
    """
    return _AllReduceSum.apply(t, key, kind)


class _GradSum(torch.autograd.Function):
    """Identity forward; backward sums the partial gradients (the backward half of :class:`_AllReduceSum`)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, key: int) -> Tensor:  # type: ignore[override]
        ctx.key = key
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return reduce_(grad.clone(), domain_of(ctx.key)), None


def grad_sum(total: Tensor, key: int) -> Tensor:
    """``total`` (already the replicated sum, e.g. kept from forward) with :func:`all_reduce_sum`'s backward.

    A rebuild that replays a sum the forward made needs no collective for its value, but the
    gradient it returns must still be the sum of the ranks' partial gradients.
    """
    return _GradSum.apply(total, key)


class _GatherDepth(torch.autograd.Function):
    """Sharded -> replicated along depth; backward: the partial gradients summed, each rank's slices kept."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, key: int) -> Tensor:  # type: ignore[override]
        ctx.key, ctx.depth = key, t.shape[2]
        return torch.cat(gather_list(t, domain_of(key), "stats"), dim=2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        domain = domain_of(ctx.key)
        total = reduce_(grad.contiguous().clone(), domain)
        start = domain.offset(ctx.depth)
        return total[:, :, start : start + ctx.depth].clone(), None


def gather_full(t: Tensor, key: int) -> Tensor:
    """The full map on every rank from its depth shards (differentiable)."""
    return _GatherDepth.apply(t, key)


def local_slices(t: Tensor, domain: Domain) -> Tensor:
    """This rank's depth slices of a replicated full map (a view)."""
    depth = t.shape[2] // domain.size
    start = domain.offset(depth)
    return t[:, :, start : start + depth]


def scatter_depth(x: Tensor, group: Any = None, multiple: int = 1) -> Tensor:
    """This rank's depth slices of ``x`` (B, C, D, ...), which every rank holds whole (e.g. a seeded batch).

    Args:
        x: the full volume, the same on every rank.
        group: the domain's process group (``None``: the world).
        multiple: the shard depth ``D / R`` must be a multiple of it (``2 ** (levels - 1)`` for an
            IDMUNet, so that every resampling level splits evenly).
    """
    domain = Domain.of(group)
    depth = x.shape[2]
    if depth % (domain.size * multiple):
        raise ValueError(
            f"depth sharding: depth {depth} over {domain.size} ranks needs a shard depth that is a multiple "
            f"of {multiple}; use a depth that is a multiple of {domain.size * multiple}"
        )
    return local_slices(x, domain).contiguous()


def gather_depth(y: Tensor, group: Any = None) -> Tensor:
    """The whole volume on every rank from each rank's depth slices (not differentiable)."""
    return torch.cat(gather_list(y.detach(), Domain.of(group)), dim=2)
