"""A "same" 3D convolution on depth shards: one exchange of ``kernel // 2`` boundary slices each way.

Forward: each rank sends its first ``h`` slices to the previous rank and its last ``h`` to the next,
and convolves its slices framed by what it received (zeros at the global volume's ends: the very
zero padding of the unsharded convolution), with ordinary zero padding in height and width. The
received halos are kept in the node, so backward rebuilds the framed input without a second
exchange. Backward: the gradient of the framed input's halo planes belongs to the neighbours'
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

__all__ = ["DomainConv3d", "halo_conv3d"]


def _framed(x: Tensor, front: Tensor, back: Tensor) -> Tensor:
    """``cat((front, x, back), depth)`` in ``x``'s memory format (channels-last stays channels-last for oneDNN)."""
    h = front.shape[2]
    fmt = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous() \
        else torch.contiguous_format
    shape = (*x.shape[:2], x.shape[2] + 2 * h, *x.shape[3:])
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    out[:, :, :h].copy_(front)
    out[:, :, h : h + x.shape[2]].copy_(x)
    out[:, :, h + x.shape[2] :].copy_(back)
    return out


class _HaloConv3d(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, key: int, groups: int
    ) -> Tensor:
        domain = domain_of(key)
        h = weight.shape[2] // 2
        if x.shape[2] < h:
            raise ValueError(f"depth sharding: a shard of {x.shape[2]} slices is thinner than the halo of {h}")
        prev, nxt = exchange_halos(x[:, :, :h], x[:, :, x.shape[2] - h :], domain)
        halo_shape = (*x.shape[:2], h, *x.shape[3:])
        front = prev if prev is not None else x.new_zeros(halo_shape)
        back = nxt if nxt is not None else x.new_zeros(halo_shape)
        pad = (0, weight.shape[3] // 2, weight.shape[4] // 2)
        framed = _framed(x, front, back)
        out = F.conv3d(framed, weight, bias, padding=pad, groups=groups)
        del framed
        # x is saved as given, so a caller's saved-tensor hooks (the coupling's rebuild of its first
        # convolution's input) still recognise it; the halos are two thin planes.
        ctx.save_for_backward(x, weight, front, back)
        ctx.key, ctx.groups, ctx.pad, ctx.has_bias = key, groups, pad, bias is not None
        return out

    @staticmethod
    @first_order_only  # the rebuild is not itself differentiable: refuse double backward
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, front, back = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        h = front.shape[2]
        framed = _framed(x, front, back)
        gi, gw, _ = torch.ops.aten.convolution_backward(
            grad_out, framed, weight, None, [1, 1, 1], list(ctx.pad), [1, 1, 1], False, [0, 0, 0], ctx.groups,
            [need_x, need_w, False],
        )
        del framed
        grad_b = grad_out.sum(dim=(0, 2, 3, 4)) if need_b and ctx.has_bias else None
        grad_x = None
        if need_x:
            # the halo planes' gradient is the neighbours' (the adjoint of the forward exchange)
            from_prev, from_next = exchange_halos(gi[:, :, :h], gi[:, :, gi.shape[2] - h :], domain_of(ctx.key))
            grad_x = gi[:, :, h : gi.shape[2] - h]
            if from_prev is not None:
                grad_x[:, :, :h] += from_prev
            if from_next is not None:
                grad_x[:, :, grad_x.shape[2] - h :] += from_next
        return grad_x, gw if need_w else None, grad_b, None, None


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
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # cast as autocast would, then run without it (the node evaluates in one dtype)
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _HaloConv3d.apply(x, weight, bias, key, groups)
    return _HaloConv3d.apply(x, weight, bias, key, groups)


class DomainConv3d(nn.Conv3d):
    """A stride-1 "same" ``nn.Conv3d`` (or :class:`~idm3d.invertible.slab_conv.SlabConv3d`) on depth shards.

    Made by :func:`~idm3d.domain.shard.shard` by switching an existing module's class, so parameters,
    names and state dict are unchanged; ``_domain_key`` names the domain.
    """

    _domain_key: int

    def forward(self, x: Tensor) -> Tensor:
        return halo_conv3d(x, self.weight, self.bias, self._domain_key, self.groups)
