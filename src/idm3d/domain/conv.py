"""A "same" 3D convolution on depth shards: one exchange of ``kernel // 2`` boundary slices each way.

Forward: each rank sends its first ``h`` slices to the previous rank and its last ``h`` to the next,
and convolves its slices framed by what it received (zeros at the global volume's ends: the very
zero padding of the unsharded convolution), with ordinary zero padding in height and width; the
frame is never built (see ``_HaloConv3d``). The received halos are kept in the node, so backward
needs no second forward exchange. Backward: the gradient of the framed input's halo planes belongs to the neighbours'
slices and goes back to them (the adjoint exchange, added to their boundary slices); the weight
and bias gradients are this rank's partial sums (summed over ranks once per step, with every other
parameter's, by :func:`~idm3d.domain.shard.sync_gradients`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm3d.domain.comm import domain_of, exchange_halos
from idm3d.invertible.mode import first_order_only
from idm3d.invertible.slab_conv import apply_in_one_dtype

__all__ = ["DomainConv3d", "halo_conv3d"]


def _thin(halo: Tensor, zeros: int, front: bool) -> Tensor:
    """``halo`` followed (``front``) or preceded by ``zeros`` zero planes: the input of a boundary correction."""
    pad = halo.new_zeros((*halo.shape[:2], zeros, *halo.shape[3:]))
    return torch.cat((halo, pad) if front else (pad, halo), dim=2)


class _HaloConv3d(torch.autograd.Function):
    """``conv(x, zero padding)`` plus the halos' share of the ``h`` boundary output planes at each end.

    Convolving the shard with ordinary zero padding and adding the halos' contribution (a convolution
    of a ``3h``-plane slab, the halo and zeros) is the convolution of the framed shard, without a
    framed copy of the shard in forward or in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, key: int, groups: int
    ) -> Tensor:
        domain = domain_of(key)
        h = weight.shape[2] // 2
        if x.shape[2] < h:
            raise ValueError(f"depth sharding: a shard of {x.shape[2]} slices is thinner than the halo of {h}")
        prev, nxt = exchange_halos(x[:, :, :h], x[:, :, x.shape[2] - h :], domain)
        pad = (h, weight.shape[3] // 2, weight.shape[4] // 2)
        out = F.conv3d(x, weight, bias, padding=pad, groups=groups)
        thin_pad = (0, *pad[1:])
        # the halos enter only the first and last h output planes
        if prev is not None:
            out[:, :, :h] += F.conv3d(_thin(prev, 2 * h, True), weight, None, padding=thin_pad, groups=groups)
        if nxt is not None:
            out[:, :, out.shape[2] - h :] += F.conv3d(_thin(nxt, 2 * h, False), weight, None, padding=thin_pad,
                                                      groups=groups)
        # x is saved as given, so a caller's saved-tensor hooks (the coupling's rebuild of its first
        # convolution's input) still recognise it; the halos are thin planes, kept so that backward
        # needs no second forward exchange
        ctx.save_for_backward(x, weight, prev, nxt)
        ctx.key, ctx.groups, ctx.pad, ctx.has_bias = key, groups, pad, bias is not None
        return out

    @staticmethod
    @first_order_only  # the rebuild is not itself differentiable: refuse double backward
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, prev, nxt = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        h = weight.shape[2] // 2
        ones, thin_pad = [1, 1, 1], [0, *ctx.pad[1:]]

        def conv_backward(g: Tensor, inp: Tensor, pad: list[int], mask: list[bool]) -> tuple[Tensor, Tensor]:
            gi, gw, _ = torch.ops.aten.convolution_backward(
                g, inp, weight, None, ones, pad, ones, False, [0, 0, 0], ctx.groups, [*mask, False]
            )
            return gi, gw

        grad_x, grad_w = conv_backward(grad_out, x, list(ctx.pad), [need_x, need_w])
        # the halos' gradient belongs to the neighbours' slices (the adjoint of the forward exchange)
        to_prev = to_next = None
        if prev is not None:
            g_thin, gw = conv_backward(grad_out[:, :, :h], _thin(prev, 2 * h, True), thin_pad, [need_x, need_w])
            to_prev = g_thin[:, :, :h] if need_x else None
            grad_w = grad_w + gw if need_w else None
        if nxt is not None:
            g_thin, gw = conv_backward(grad_out[:, :, grad_out.shape[2] - h :], _thin(nxt, 2 * h, False), thin_pad,
                                       [need_x, need_w])
            to_next = g_thin[:, :, 2 * h :] if need_x else None
            grad_w = grad_w + gw if need_w else None
        if need_x:
            zero = grad_x.new_zeros((*grad_x.shape[:2], h, *grad_x.shape[3:]))
            from_prev, from_next = exchange_halos(
                zero if to_prev is None else to_prev, zero if to_next is None else to_next, domain_of(ctx.key)
            )
            if from_prev is not None:
                grad_x[:, :, :h] += from_prev
            if from_next is not None:
                grad_x[:, :, grad_x.shape[2] - h :] += from_next
        grad_b = grad_out.sum(dim=(0, 2, 3, 4)) if need_b and ctx.has_bias else None
        return grad_x if need_x else None, grad_w if need_w else None, grad_b, None, None


def halo_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, key: int, groups: int = 1) -> Tensor:
    """``F.conv3d(x_full, weight, bias, padding=kernel // 2)`` restricted to this rank's depth slices.

    Args:
        x: this rank's slices ``(B, C_in, d, H, W)``.
        weight: ``(C_out, C_in / groups, kd, kh, kw)``, odd sizes.
        bias: ``(C_out,)`` or ``None``.
        key: the registered domain (:func:`~idm3d.domain.comm.register`).
        groups: convolution groups.
    """
    if weight.shape[2] // 2 == 0:  # no depth extent: nothing crosses a shard boundary
        return F.conv3d(x, weight, bias, padding=(0, weight.shape[3] // 2, weight.shape[4] // 2), groups=groups)
    return apply_in_one_dtype(_HaloConv3d, x, weight, bias, key, groups)


class DomainConv3d(nn.Conv3d):
    """A stride-1 "same" ``nn.Conv3d`` (or :class:`~idm3d.invertible.slab_conv.SlabConv3d`) on depth shards.

    Made by :func:`~idm3d.domain.shard.shard` by switching an existing module's class, so parameters,
    names and state dict are unchanged; ``_domain_key`` names the domain.
    """

    _domain_key: int

    def forward(self, x: Tensor) -> Tensor:
        return halo_conv3d(x, self.weight, self.bias, self._domain_key, self.groups)
