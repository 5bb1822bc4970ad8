"""The no-grad in-place steps of a core: a coupling's update, orthogonal resampling over its own input.

Built on :mod:`~idm3d.invertible.inplace`; :class:`~idm3d.invertible.coupling.AdditiveCoupling`,
the resamplings and the stack ops call these from their ``forward_`` (the segment's no-grad path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from idm3d.invertible.inplace import (
    GroupMoments,
    budget,
    conv_planes,
    edge_planes,
    edge_planes_of,
    group_moments,
    norm_act_planes,
    planes_for,
    regroup_view,
)
from idm3d.invertible.slab_conv import slab_ranges

__all__ = ["coupling_add_", "resample_in_place"]


def _map_bytes(x: Tensor, channels: int) -> int:
    return x[:, :1].numel() * channels * max(x.element_size(), 4)


def coupling_add_(net: torch.nn.Module, x1: Tensor, x2: Tensor, cond: Sequence[Tensor]) -> None:
    """``x2 += net(x1, *cond)`` for a :class:`~idm3d.invertible.coupling.ConditionedConvNet`, without a graph.

    Where ``net``'s full-size temporaries (its input activation, hidden map and output) fit the
    budget's ``work_bytes`` it runs whole, through its own modules (bitwise the graph path's
    values). Otherwise in depth slabs: pass 1 computes the hidden map slab by slab for its GroupNorm
    statistics, keeping the slabs that fit ``work_bytes``; pass 2 normalises each output slab's
    hidden planes (kept or recomputed from ``x1``, plus a one-plane halo), convolves them and adds
    the result into ``x2``'s planes. ``x1`` is only read, so the writes cannot disturb later slabs.
    On a depth shard (:func:`~idm3d.invertible.inplace.depth_neighbours`) the statistics are the
    volume's, and the planes beyond the shard's ends (of ``x1`` and of the hidden map) the neighbours'.
    """
    hidden = net.conv1.out_channels
    full = _map_bytes(x1, x1.shape[1]) + _map_bytes(x1, hidden) + _map_bytes(x1, x2.shape[1])
    lim = budget()
    if full <= lim.work_bytes:
        x2.add_(net(x1, *cond))
        return
    scale = shift = None
    if net.film is not None:
        scale, shift = net._film(x1, cond)
        scale = 1 + scale
    stats1 = group_moments(x1, net.norm1.num_groups, net.norm1.eps)
    halo1 = net.conv1.weight.shape[2] // 2
    halo2 = net.conv2.weight.shape[2] // 2
    depth = x1.shape[2]
    ranges = slab_ranges(depth, planes_for(x1, max(x1.shape[1], hidden, x2.shape[1])))

    edges1 = edge_planes(x1, halo1)

    def hidden_planes(lo: int, hi: int) -> Tensor:  # conv1's output planes [lo, hi)
        return conv_planes(norm_act_planes(x1, lo, hi, net.norm1, stats1, halo1, edges=edges1), net.conv1)

    acc = GroupMoments(x1.shape[0], net.norm2.num_groups)
    kept: dict[int, Tensor] = {}  # first plane -> hidden slab, while the budget lasts
    room = lim.work_bytes
    for d0, d1 in ranges:
        h = hidden_planes(d0, d1)
        acc.add(h)
        nbytes = h.numel() * h.element_size()
        if nbytes <= room:
            kept[d0], room = h, room - nbytes
        del h
    stats2 = acc.stats(net.norm2.eps, x1.device)
    edges2 = edge_planes_of(hidden_planes, depth, halo2)  # recomputed: 2 * halo2 planes of conv1
    cache: tuple[int, Tensor] | None = None  # the last recomputed run: its halo serves the next slab

    def gather(lo: int, hi: int) -> Tensor:
        nonlocal cache
        pieces, p = [], lo
        while p < hi:
            start = max(d0 for d0, _ in ranges if d0 <= p)
            if start in kept:
                end = min(hi, start + kept[start].shape[2])
                pieces.append(kept[start][:, :, p - start : end - start])
            elif cache is not None and cache[0] <= p < cache[0] + cache[1].shape[2]:
                end = min(hi, cache[0] + cache[1].shape[2])
                pieces.append(cache[1][:, :, p - cache[0] : end - cache[0]])
            else:
                end = p + 1
                while end < hi and max(d0 for d0, _ in ranges if d0 <= end) not in kept:
                    end += 1
                h = hidden_planes(p, end)
                cache = (p, h)
                pieces.append(h)
            p = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    for o0, o1 in ranges:
        lo, hi = max(o0 - halo2, 0), min(o1 + halo2, depth)
        h = gather(lo, hi)
        # h holds planes [lo, hi); the volume's edges are its edges, where the halo is zero padding
        a = norm_act_planes(h, o0 - lo, o1 - lo, net.norm2, stats2, halo2, scale, shift, edges2)
        x2[:, :, o0:o1].add_(conv_planes(a, net.conv2))
        del h, a


def resample_in_place(x: Tensor, kernel: Tensor, channels: int, transpose: bool) -> Tensor | None:
    """An orthogonal 2x2x2 down- (``transpose=False``) or upsampling written over its input, or ``None``.

    Output channels ``8c..8c+7`` of a downsampling depend on input channel ``c`` alone and have as
    many elements, in the same place of a dense sample: each block is computed, then copied over
    the input it came from. An upsampling is the mirror. ``None`` where ``x``'s samples are not dense.
    """
    b, c, d, h, w = x.shape
    shape = (b, c // 8, 2 * d, 2 * h, 2 * w) if transpose else (b, 8 * c, d // 2, h // 2, w // 2)
    out = regroup_view(x, shape)
    if out is None:
        return None
    per_in = 8 if transpose else 1  # input channels per resampling group
    group_bytes = x[:, :per_in].numel() * x.element_size()
    step = max(1, budget().slab_bytes // max(group_bytes, 1))
    conv = F.conv_transpose3d if transpose else F.conv3d
    with torch.autocast(x.device.type, enabled=False):  # orthogonal only in the state's precision
        kernel = kernel.to(x.dtype)
        for g0 in range(0, channels, step):
            g1 = min(g0 + step, channels)
            block = conv(x[:, g0 * per_in : g1 * per_in], kernel[8 * g0 : 8 * g1], stride=2, groups=g1 - g0)
            if transpose:
                out[:, g0:g1].copy_(block)
            else:
                out[:, 8 * g0 : 8 * g1].copy_(block)
    return out
