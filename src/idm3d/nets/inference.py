"""IDMUNet's no-grad forward: the stem into one state buffer, the core in place, the head in slabs.

Sampling calls the denoiser without a graph. Then the state the stem makes is the only
full-resolution buffer the core needs: couplings add into it, the resamplings write over the channels
they came from, skip joins are views (:meth:`~idm3d.invertible.InvertibleSequence.forward_`). The
stem and head run in depth slabs where their full-size temporaries would pass the budget's
``work_bytes`` (:func:`~idm3d.invertible.inplace.inference_budget`): GroupNorm statistics over the
whole volume first, then each slab normalised, activated in place and convolved with its halo. A
stem or head that fits runs its own modules, so small volumes give the graph path's values bitwise.
On a depth shard (:func:`~idm3d.invertible.inplace.depth_neighbours`) the slabs at the shard's ends
read the neighbours' planes where the volume's ends read zero padding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from idm3d.invertible.inplace import (
    GroupMoments,
    budget,
    conv_planes,
    conv_slab,
    edge_planes,
    edge_planes_of,
    group_moments,
    norm_act_planes,
    planes_for,
)
from idm3d.invertible.slab_conv import slab_ranges
from idm3d.nets.bookends import Head, Stem

__all__ = ["head_no_grad", "stem_no_grad"]


def _map_bytes(x: Tensor, channels: int) -> int:
    return x[:, :1].numel() * channels * max(x.element_size(), 4)


@torch.no_grad()
def stem_no_grad(stem: Stem, x: Tensor) -> Tensor:
    """``stem(x).to(x.dtype)`` with at most a slab of full-resolution temporaries beyond its output.

    The middle map's GroupNorm statistics need the whole middle map: its first convolution (from the
    few input channels, cheap) runs twice, once for them and once per output slab.
    """
    body = stem.body
    if not isinstance(body, nn.Sequential):
        return body(x).to(x.dtype)  # one 1x1x1 convolution: its output is the state itself
    conv1, norm, _, conv2 = body
    mid = conv1.out_channels
    if 3 * _map_bytes(x, mid) <= budget().work_bytes:
        return stem(x).to(x.dtype)
    depth = x.shape[2]
    ranges = slab_ranges(depth, planes_for(x, max(mid, conv2.out_channels)))
    edges_x = edge_planes(x, conv1.weight.shape[2] // 2)
    acc = GroupMoments(x.shape[0], norm.num_groups)
    for d0, d1 in ranges:
        acc.add(conv_slab(x, conv1, d0, d1, edges_x))
    stats = acc.stats(norm.eps, x.device)
    out = x.new_empty(x.shape[0], conv2.out_channels, *x.shape[2:])
    halo = conv2.weight.shape[2] // 2
    edges_mid = edge_planes_of(lambda lo, hi: conv_slab(x, conv1, lo, hi, edges_x), depth, halo)
    for o0, o1 in ranges:
        lo, hi = max(o0 - halo, 0), min(o1 + halo, depth)
        a = norm_act_planes(conv_slab(x, conv1, lo, hi, edges_x), o0 - lo, o1 - lo, norm, stats, halo, edges=edges_mid)
        out[:, :, o0:o1] = conv_planes(a, conv2)
        del a
    return out


@torch.no_grad()
def head_no_grad(head: Head, state: Tensor) -> Tensor:
    """``head(state)`` with at most a slab of full-resolution temporaries beyond its output."""
    body = head.body
    if not isinstance(body, nn.Sequential):
        return body(state)
    norm, _, conv = body
    if 2 * _map_bytes(state, state.shape[1]) <= budget().work_bytes:
        return head(state)
    stats = group_moments(state, norm.num_groups, norm.eps)
    halo = conv.weight.shape[2] // 2
    edges = edge_planes(state, halo)
    out: Tensor | None = None
    for o0, o1 in slab_ranges(state.shape[2], planes_for(state, state.shape[1])):
        y = conv_planes(norm_act_planes(state, o0, o1, norm, stats, halo, edges=edges), conv)
        if out is None:  # the dtype autocast gives the convolution
            out = y.new_empty(state.shape[0], conv.out_channels, *state.shape[2:])
        out[:, :, o0:o1] = y
    assert out is not None
    return out
