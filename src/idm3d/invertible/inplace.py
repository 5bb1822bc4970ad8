"""No-grad forward primitives that work in the state's own memory, for sampling.

Without a graph nothing has to be kept for backward, so an invertible network can run like the
memory-efficient backward rebuilds: a coupling adds ``F(x1)`` into ``x2``'s channels, an orthogonal
down/upsampling writes its result over its input one channel at a time (output channels ``8c..8c+7``
of a downsampling occupy exactly input channel ``c``'s memory), a skip join is a wider view of the
buffer the skip was split from. What remains are the working maps of ``F``; a large ``F`` runs in
depth slabs: GroupNorm statistics over the whole volume first (``group_moments``), then each slab
normalised, activated in place and convolved with a halo, as :mod:`~idm3d.invertible.slab_conv`
does. The hidden map's statistics need the whole hidden map, so it is computed twice (once for the
statistics, once for the second convolution) except for the slabs that fit ``work_bytes``.

The sizes come from :func:`inference_budget` (a context variable, like the memory-efficient mode):
a sub-network whose full-size temporaries fit ``work_bytes`` runs unsplit, through the very modules of
the graph path, so its result equals theirs bitwise; only larger ones take the slab path, whose
statistics are summed in another order (equal to ~1e-7 relative, see ``tests/test_inference.py``).

On depth shards (:mod:`idm3d.domain.lean`) the same primitives run on a rank's slices: a
:class:`DepthNeighbours` set by :func:`depth_neighbours` (a context variable, so this package never
imports the domain package) makes every :class:`GroupMoments` the whole volume's and supplies the
planes beyond the shard's ends (``edges``) where the unsharded path reads zero padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm3d.invertible.slab_conv import _slab_input, slab_ranges

__all__ = [
    "Budget",
    "DepthNeighbours",
    "Edges",
    "GroupMoments",
    "adjacent_join",
    "budget",
    "conv_planes",
    "depth_neighbours",
    "edge_planes",
    "edge_planes_of",
    "group_moments",
    "inference_budget",
    "norm_act_planes",
    "planes_for",
    "regroup_view",
    "slab_input",
]

MIB = 2**20


class Budget(NamedTuple):
    """Sizes of the no-grad path: ``slab_bytes`` per slab temporary, ``work_bytes`` of full-size working maps."""

    slab_bytes: int = 32 * MIB
    work_bytes: int = 256 * MIB


_DEFAULT = Budget()
_BUDGET: ContextVar[Budget | None] = ContextVar("idm3d_inference_budget", default=None)


@contextmanager
def inference_budget(slab_bytes: int | None = None, work_bytes: int | None = None) -> Iterator[None]:
    """Within the block, no-grad forwards use these sizes (``None`` keeps the current one).

    Args:
        slab_bytes: bytes one depth-slab temporary may take (its planes follow from it).
        work_bytes: bytes of full-size working maps a sub-network may hold; larger ones run in slabs,
            keeping this many bytes of their hidden map and recomputing the rest.
    """
    old = budget()
    new = Budget(old.slab_bytes if slab_bytes is None else int(slab_bytes),
                 old.work_bytes if work_bytes is None else int(work_bytes))
    if new.slab_bytes < 1 or new.work_bytes < 0:
        raise ValueError(f"inference_budget: slab_bytes must be >= 1 and work_bytes >= 0, got {new}")
    token = _BUDGET.set(new)
    try:
        yield
    finally:
        _BUDGET.reset(token)


def budget() -> Budget:
    """The sizes in force."""
    return _BUDGET.get() or _DEFAULT


# The planes just before and just after this rank's slices (``None``: beyond the volume, zero padding).
Edges = tuple[Tensor | None, Tensor | None]


class DepthNeighbours:
    """What a depth-sharded no-grad forward supplies to the primitives here (see :func:`depth_neighbours`).

    The base class is the unsharded volume: statistics stay as they are and no planes lie beyond its ends.
    """

    def combine(self, mean: Tensor, m2: Tensor, count: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
        """The whole volume's ``(mean, m2, count)`` (float64, CPU) from this shard's; a collective."""
        return mean, m2, count

    def exchange(self, first: Tensor, last: Tensor) -> Edges:
        """Send ``first`` to the previous shard and ``last`` to the next; return what they sent; a collective."""
        return None, None


_NEIGHBOURS: ContextVar[DepthNeighbours | None] = ContextVar("idm3d_depth_neighbours", default=None)


@contextmanager
def depth_neighbours(neighbours: DepthNeighbours | None) -> Iterator[None]:
    """Within the block, the no-grad primitives run on a depth shard whose neighbours ``neighbours`` reaches.

    Every rank of the domain must make the same calls inside (the statistics and edges are collectives).
    """
    token = _NEIGHBOURS.set(neighbours)
    try:
        yield
    finally:
        _NEIGHBOURS.reset(token)


def edge_planes_of(make: Callable[[int, int], Tensor], depth: int, halo: int) -> Edges:
    """The ``halo`` planes beyond each end of a map of local ``depth`` whose planes ``make(lo, hi)`` computes.

    Unsharded (no :func:`depth_neighbours`) both are ``None`` and nothing is computed; on a shard each
    rank computes its own first and last ``halo`` planes and swaps them with its neighbours.
    """
    neighbours = _NEIGHBOURS.get()
    if neighbours is None or halo == 0:
        return None, None
    return neighbours.exchange(make(0, halo).contiguous(), make(depth - halo, depth).contiguous())


def edge_planes(x: Tensor, halo: int) -> Edges:
    """:func:`edge_planes_of` a map held whole on this rank."""
    return edge_planes_of(lambda lo, hi: x[:, :, lo:hi], x.shape[2], halo)


def planes_for(x: Tensor, channels: int, slab_bytes: int | None = None) -> int:
    """Depth planes of a ``channels``-wide slab of ``x``'s grid and batch that fit ``slab_bytes``."""
    limit = budget().slab_bytes if slab_bytes is None else slab_bytes
    plane = x.shape[0] * channels * x.shape[3] * x.shape[4] * max(x.element_size(), 4)
    return max(1, limit // max(plane, 1))


class GroupMoments:
    """Per-(sample, group) mean and variance, accumulated slab by slab (Chan et al.'s pairwise update, float64)."""

    def __init__(self, batch: int, groups: int) -> None:
        self.groups = groups
        self.dtype = torch.float32  # that of the statistics: float32, float64 for a float64 map
        self.count = 0
        self.mean = torch.zeros(batch, groups, dtype=torch.float64)
        self.m2 = torch.zeros(batch, groups, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        """Add a slab ``(B, C, d, H, W)``; channels are grouped as ``nn.GroupNorm`` groups them."""
        b, _c = x.shape[:2]
        self.dtype = torch.promote_types(x.dtype, torch.float32)
        part = x.to(self.dtype).reshape(b, self.groups, -1)
        # two-pass moments with ATen's cascade sums: ~1e-7 relative, 8x faster than var_mean's Welford
        mean = part.mean(-1, keepdim=True)
        centred = part - mean
        var = centred.square_().mean(-1)
        mean = mean[..., 0]
        del centred
        n = part.shape[-1]
        mean, var = mean.double().cpu(), var.double().cpu()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += var * n + delta.square() * (self.count * n / total)
        self.count = total

    def stats(self, eps: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(mean, rstd)``, ``(B, G)``, in the maps' dtype (at least float32) as ``native_group_norm`` gives them.

        On a depth shard (:func:`depth_neighbours`) these are the whole volume's (a collective).
        """
        mean, m2, count = self.mean, self.m2, self.count
        neighbours = _NEIGHBOURS.get()
        if neighbours is not None:
            mean, m2, count = neighbours.combine(mean, m2, count, device)
        var = (m2 / count).clamp_min(0)
        return mean.to(device, self.dtype), (var + eps).rsqrt().to(device, self.dtype)


def group_moments(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """GroupNorm's ``(mean, rstd)`` of ``x`` over the whole volume, read slab by slab (no full-size copy)."""
    acc = GroupMoments(x.shape[0], groups)
    for d0, d1 in slab_ranges(x.shape[2], planes_for(x, x.shape[1])):
        acc.add(x[:, :, d0:d1])
    return acc.stats(eps, x.device)


def norm_act_planes(
    x: Tensor,
    lo: int,
    hi: int,
    norm: nn.GroupNorm,
    stats: tuple[Tensor, Tensor],
    halo: int,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    edges: Edges = (None, None),
) -> Tensor:
    """``silu(addcmul(shift, norm(x), scale))`` on planes ``[lo - halo, hi + halo)``, zeros outside the volume.

    The zeros are the padding of the convolution that reads the result: "same" padding pads the
    activation, not ``x``. ``stats`` are the whole volume's (:func:`group_moments`), so every slab is
    normalised as the whole-volume GroupNorm normalises it. ``edges``: ``x``'s planes beyond its ends
    on a depth shard (:func:`edge_planes`), normalised in place of the zeros. One new slab-sized tensor.
    """
    mean, rstd = stats
    b, c = x.shape[:2]
    g = norm.num_groups
    depth = x.shape[2]
    part = x[:, :, max(lo - halo, 0) : min(hi + halo, depth)]
    # GroupNorm's own affine form: y = x * (rstd * w) + (b - mean * rstd * w)
    r = rstd.reshape(b, g, 1).expand(b, g, c // g).reshape(b, c)
    m = mean.reshape(b, g, 1).expand(b, g, c // g).reshape(b, c)
    w = norm.weight if norm.affine else torch.ones(c, device=x.device)
    bias = norm.bias if norm.affine else torch.zeros(c, device=x.device)
    # GroupNorm computes in at least float32 (autocast runs it in float32 too)
    dt = torch.promote_types(x.dtype, torch.float32)
    a = (r.to(dt) * w.to(dt))[:, :, None, None, None]
    a0 = (bias.to(dt) - m.to(dt) * a[:, :, 0, 0, 0])[:, :, None, None, None]

    def fill(dst: Tensor, src: Tensor) -> None:
        torch.addcmul(a0, src.to(dt), a, out=dst)
        if scale is not None and shift is not None:
            torch.addcmul(shift.to(dt), dst, scale.to(dt), out=dst)  # the FiLM the graph path runs
        F.silu(dst, inplace=True)

    # the zero (or neighbour) planes of the halo are part of the one new tensor (no padded copy)
    front, back = max(0, halo - lo), max(0, hi + halo - depth)
    out = part.new_empty((b, c, front + part.shape[2] + back, *part.shape[3:]), dtype=dt)
    prev, nxt = edges
    if front:
        if prev is None:
            out[:, :, :front].zero_()
        else:
            fill(out[:, :, :front], prev[:, :, prev.shape[2] - front :])
    if back:
        if nxt is None:
            out[:, :, out.shape[2] - back :].zero_()
        else:
            fill(out[:, :, out.shape[2] - back :], nxt[:, :, :back])
    fill(out[:, :, front : front + part.shape[2]], part)
    return out


def conv_planes(a: Tensor, conv: nn.Conv3d) -> Tensor:
    """A "same" stride-1 convolution of planes that already carry their depth halo: ``halo`` planes fewer out.

    On CPU the call goes to oneDNN directly: ATen's heuristic picks its native loop (several times
    slower) for a 5D input whose ``N*C*D*H`` is under 20,480, which a slab of a few planes often is.
    """
    k = conv.weight.shape[2:]
    padding = (0, k[1] // 2, k[2] // 2)
    weight, bias = conv.weight, conv.bias
    device = a.device.type
    if device != "cpu" or not torch.backends.mkldnn.is_available():
        return F.conv3d(a, weight, bias, padding=padding, groups=conv.groups)
    if torch.is_autocast_enabled(device):
        # cast as autocast would; the direct call has no autocast rule of its own
        dtype = torch.get_autocast_dtype(device)
        a, weight = a.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if a.dtype not in (torch.float32, torch.bfloat16) or a.dtype != weight.dtype:
        return F.conv3d(a, weight, bias, padding=padding, groups=conv.groups)
    return torch.ops.aten.mkldnn_convolution(a.contiguous(), weight, bias, padding, (1, 1, 1), (1, 1, 1), conv.groups)


def slab_input(x: Tensor, lo: int, hi: int, halo: int, edges: Edges = (None, None)) -> Tensor:
    """Planes ``[lo - halo, hi + halo)`` of ``x``: zeros beyond its ends, or the neighbours' ``edges`` on a shard."""
    prev, nxt = edges
    if prev is None and nxt is None:
        return _slab_input(x, lo, hi, halo)[0]
    depth = x.shape[2]
    front, back = max(0, halo - lo), max(0, hi + halo - depth)
    parts = [x[:, :, max(lo - halo, 0) : min(hi + halo, depth)]]
    if front:
        zeros = x.new_zeros((*x.shape[:2], front, *x.shape[3:]))
        parts.insert(0, zeros if prev is None else prev[:, :, prev.shape[2] - front :])
    if back:
        parts.append(x.new_zeros((*x.shape[:2], back, *x.shape[3:])) if nxt is None else nxt[:, :, :back])
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def conv_slab(x: Tensor, conv: nn.Conv3d, lo: int, hi: int, edges: Edges = (None, None)) -> Tensor:
    """Output planes ``[lo, hi)`` of ``conv(x)`` ("same" padding, stride 1), reading only the planes they need.

    ``edges``: ``x``'s planes beyond its ends on a depth shard (:func:`edge_planes`), else zero padding.
    """
    return conv_planes(slab_input(x, lo, hi, conv.weight.shape[2] // 2, edges), conv)


def regroup_view(x: Tensor, shape: Sequence[int]) -> Tensor | None:
    """A view of ``x``'s memory with ``shape`` (same batch), or ``None`` where a sample's elements are not dense.

    An orthogonal resampling maps a sample's ``C*D*H*W`` elements to as many; where ``x`` holds them
    in one dense run per sample (a channel block of a contiguous state), the result can live there.
    """
    dense = torch.empty(0).new_empty(tuple(x.shape[1:])).stride() if x.dim() == 5 else None
    if dense is None or tuple(x.stride()[1:]) != tuple(dense) or x.shape[0] != shape[0]:
        return None
    sample = torch.empty(0).new_empty(tuple(shape[1:])).stride()
    return x.as_strided(tuple(shape), (x.stride(0), *sample), x.storage_offset())


def adjacent_join(a: Tensor, b: Tensor) -> Tensor | None:
    """``cat((a, b), dim=1)`` as a view, where ``b``'s channels follow ``a``'s in one buffer; else ``None``."""
    if (
        a.dim() != b.dim()
        or a.dtype != b.dtype
        or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        or a.stride() != b.stride()
        or a.shape[:1] + a.shape[2:] != b.shape[:1] + b.shape[2:]
        or b.storage_offset() != a.storage_offset() + a.shape[1] * a.stride(1)
    ):
        return None
    return a.as_strided((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), a.stride(), a.storage_offset())
