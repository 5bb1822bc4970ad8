"""GroupNorm, optional FiLM, SiLU as one autograd node that saves only its input and the statistics.

Under plain autograd ``silu(addcmul(shift, group_norm(x), scale))`` saves the normalised map, the
FiLM output and keeps the SiLU input, and its backward materialises several more feature maps
(the gradients of each stage and the products for the FiLM reductions). At full resolution these
temporaries are what sets the training peak of the memory-efficient IDMUNet. :func:`group_norm_silu`
computes the same forward with the same ATen kernels (bitwise equal), saves ``x`` plus the
per-group mean and reciprocal std, and in backward rebuilds the pre-activation into one buffer,
turns it into the gradient in place and hands that to ATen's GroupNorm backward: at most two
feature maps of ``x``'s size beyond the incoming gradient. The FiLM scale's gradient is reduced
from ``x`` directly (``sum(dz * n) = rstd * w * (sum(dz * x) - mean * sum(dz)) + b * sum(dz)``)
by batched matrix products, so no product map is formed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from idm3d.invertible.mode import first_order_only

__all__ = ["group_norm_silu"]


def _film_shape(t: Tensor, x: Tensor, name: str) -> Tensor:
    if t.shape != (x.shape[0], x.shape[1], 1, 1, 1):
        expected = (x.shape[0], x.shape[1], 1, 1, 1)
        raise ValueError(f"group_norm_silu: {name} must have shape {expected}, got {tuple(t.shape)}")
    return t


_CL = torch.channels_last_3d
_CHUNK = 1 << 15  # positions per product chunk of the channels-last dots


def _layout(t: Tensor) -> torch.memory_format:
    """The layout the kernels run in: channels-last where ``t`` has it, on CPU only."""
    cl = t.device.type == "cpu" and t.is_contiguous(memory_format=_CL) and not t.is_contiguous()
    return _CL if cl else torch.contiguous_format


def _channel_dots(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum`` over the spatial axes, per (sample, channel), without forming ``a * b``."""
    n, c = a.shape[:2]
    if _layout(a) == torch.contiguous_format:
        return torch.bmm(a.reshape(n * c, 1, -1), b.reshape(n * c, -1, 1)).reshape(n, c, 1, 1, 1)
    # channels last: (N, positions, C) views; the products are formed a bounded chunk at a time
    a, b = a.permute(0, 2, 3, 4, 1).reshape(n, -1, c), b.permute(0, 2, 3, 4, 1).reshape(n, -1, c)
    dots = sum((a[:, i : i + _CHUNK] * b[:, i : i + _CHUNK]).sum(1) for i in range(0, a.shape[1], _CHUNK))
    return dots.reshape(n, c, 1, 1, 1)


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        groups: int,
        eps: float,
        scale: Tensor | None,
        shift: Tensor | None,
        channels_last: bool,
    ) -> Tensor:
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        ctx.layout = _layout(x)
        # x is saved as given (a channel view of a coupling's state costs nothing); a dense copy
        # lives only while a kernel needs it
        dense = x.contiguous(memory_format=ctx.layout)
        out, mean, rstd = torch.native_group_norm(dense, weight, bias, n, c, hw, groups, eps)
        del dense
        if scale is not None:
            out = torch.addcmul(shift, out, scale)  # the same op the composite module runs
        out = torch.nn.functional.silu(out, inplace=True)
        if channels_last:
            out = out.contiguous(memory_format=_CL)
        ctx.save_for_backward(x, weight, bias, mean, rstd, scale, shift)
        ctx.groups, ctx.eps = groups, eps
        return out

    @staticmethod
    @first_order_only  # the rebuild is not itself differentiable: refuse double backward
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, mean, rstd, scale, shift = ctx.saved_tensors
        need_x, need_w, need_b, _, _, need_scale, need_shift = ctx.needs_input_grad[:7]
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        x = x.contiguous(memory_format=ctx.layout)
        # z: the SiLU input, rebuilt as the forward made it, then overwritten by dL/dz.
        z = torch.native_group_norm(x, weight, bias, n, c, hw, ctx.groups, ctx.eps)[0]
        if scale is not None:
            torch.addcmul(shift, z, scale, out=z)
        # grad may come channels-last (from a convolution): elementwise kernels take mixed layouts
        torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=z)
        g_scale = g_shift = None
        if scale is not None:
            dz_sum = z.sum(dim=(2, 3, 4), keepdim=True)
            if need_shift:
                g_shift = dz_sum
            if need_scale:
                # sum(dz * n) per channel, n = (x - mean_g) * rstd_g * w + b, from sums over x and dz
                groups = ctx.groups
                m = mean.reshape(n, groups, 1).expand(n, groups, c // groups).reshape(n, c, 1, 1, 1)
                r = rstd.reshape(n, groups, 1).expand(n, groups, c // groups).reshape(n, c, 1, 1, 1)
                w = weight.reshape(1, c, 1, 1, 1) if weight is not None else 1.0
                dot = r * w * (_channel_dots(z, x) - m * dz_sum)
                if bias is not None:
                    dot = dot + bias.reshape(1, c, 1, 1, 1) * dz_sum
                g_scale = dot.to(scale.dtype)
            z.mul_(scale)  # dL/d(normalised x)
        mask = [need_x, need_w and weight is not None, need_b and bias is not None]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(z, x, mean, rstd, weight, n, c, hw, ctx.groups, mask)
        return gx, gw, gb, None, None, g_scale, g_shift, None


def group_norm_silu(
    x: Tensor,
    norm: nn.GroupNorm,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    channels_last: bool = False,
) -> Tensor:
    """``silu(addcmul(shift, norm(x), scale))`` (or ``silu(norm(x))``) as one memory-lean autograd node.

    Args:
        x: ``(B, C, D, H, W)``, contiguous or channels-last.
        norm: the ``nn.GroupNorm`` whose groups, eps and affine parameters apply.
        scale: FiLM multiplier ``(B, C, 1, 1, 1)`` (``1 + s``), or ``None``.
        shift: FiLM offset ``(B, C, 1, 1, 1)``; given exactly when ``scale`` is.
        channels_last: on CPU, return the result in ``torch.channels_last_3d`` layout (the
            values are the same): oneDNN's 3D convolutions then need no reordered copies of their
            operands, and their backward runs faster. The result keeps ``x``'s layout otherwise.
    """
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_silu: scale and shift go together")
    if x.dim() != 5 or x.shape[1] != norm.num_channels:
        raise ValueError(f"group_norm_silu: expected (B, {norm.num_channels}, D, H, W), got {tuple(x.shape)}")
    if scale is not None:
        _film_shape(scale, x, "scale")
        _film_shape(shift, x, "shift")
    device = x.device.type
    channels_last = channels_last and device == "cpu"
    if torch.is_autocast_enabled(device):
        # GroupNorm autocasts to fp32: keep the composite path there (the fused node has one dtype).
        out = norm(x)
        if scale is not None:
            out = torch.addcmul(shift, out, scale)
        out = torch.nn.functional.silu(out)
        return out.contiguous(memory_format=_CL) if channels_last else out
    sharded = getattr(norm, "group_norm_silu", None)  # a depth-sharded norm (idm3d.domain) reduces across ranks
    if sharded is not None:
        return sharded(x, scale, shift, channels_last)
    return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift, channels_last)
