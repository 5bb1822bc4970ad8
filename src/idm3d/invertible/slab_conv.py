"""3D convolution computed in depth slabs with a halo: the same result, bounded working memory.

On CPU, oneDNN serves a ``Conv3d`` weight gradient with its naive reference kernel
(``ref:any``, far slower than its jit kernels) once a tensor of the call passes 2 GiB, e.g. a
32-channel 256^3 fp32 feature map (``ONEDNN_VERBOSE=1`` names the kernel each call gets). Its
blocked-layout copies of a whole volume, and any im2col scratch, also scale with the volume.
:class:`SlabConv3d` therefore runs a large
"same"-padded, stride-1 convolution as a loop over depth slabs: each slab reads its planes plus a
halo of ``kernel // 2`` planes on either side (zeros beyond the volume), writes its own output
planes, and in backward adds its input gradient into the overlapping planes and its weight and
bias gradients into one sum. The result equals ``nn.Conv3d`` up to float summation order; small
inputs take the ordinary single call. MAISI's autoencoder splits its convolutions the same way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm3d.invertible.mode import first_order_only

__all__ = ["DEFAULT_SLAB_BYTES", "SlabConv3d", "slab_conv3d", "slab_ranges"]

# Per-slab bytes of input + output: far under the 2 GiB where oneDNN falls back to its reference
# kernel, and large enough that 128^3 IDMUNet convolutions still run unsplit.
DEFAULT_SLAB_BYTES = 512 * 2**20


def slab_ranges(depth: int, planes: int) -> list[tuple[int, int]]:
    """``[(d0, d1), ...]`` covering ``range(depth)`` in slabs of at most ``planes`` planes."""
    if depth < 1 or planes < 1:
        raise ValueError(f"slab_ranges: depth and planes must be >= 1, got {depth}, {planes}")
    return [(d0, min(d0 + planes, depth)) for d0 in range(0, depth, planes)]


def _slab_input(x: Tensor, d0: int, d1: int, halo: int) -> tuple[Tensor, int, int]:
    """Planes ``[d0 - halo, d1 + halo)`` of ``x`` (zeros outside), and the zero planes added front/back."""
    depth = x.shape[2]
    lo, hi = d0 - halo, d1 + halo
    front, back = max(0, -lo), max(0, hi - depth)
    part = x[:, :, max(lo, 0) : min(hi, depth)]
    if front or back:
        part = F.pad(part, (0, 0, 0, 0, front, back))
    return part, front, back


class _SlabConv3dFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, planes: int, groups: int
    ) -> Tensor:
        halo = weight.shape[2] // 2
        pad_hw = (0, weight.shape[3] // 2, weight.shape[4] // 2)
        out = x.new_empty(x.shape[0], weight.shape[0], *x.shape[2:])
        for d0, d1 in slab_ranges(x.shape[2], planes):
            part, _, _ = _slab_input(x, d0, d1, halo)
            out[:, :, d0:d1] = F.conv3d(part, weight, bias, padding=pad_hw, groups=groups)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.planes, ctx.groups, ctx.pad_hw = bias is not None, planes, groups, pad_hw
        return out

    @staticmethod
    @first_order_only  # the rebuild is not itself differentiable: refuse double backward
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        halo, depth = weight.shape[2] // 2, x.shape[2]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = grad_out.sum(dim=(0, 2, 3, 4)) if need_b and ctx.has_bias else None
        for d0, d1 in slab_ranges(depth, ctx.planes):
            part, front, back = _slab_input(x, d0, d1, halo)
            gi, gw, _ = torch.ops.aten.convolution_backward(
                grad_out[:, :, d0:d1].contiguous(),
                part.contiguous(),
                weight,
                None,
                [1, 1, 1],
                list(ctx.pad_hw),
                [1, 1, 1],
                False,
                [0, 0, 0],
                ctx.groups,
                [need_x, need_w, False],
            )
            if grad_x is not None:
                lo, hi = max(d0 - halo, 0), min(d1 + halo, depth)
                grad_x[:, :, lo:hi] += gi[:, :, front : gi.shape[2] - back]
            if grad_w is not None:
                grad_w += gw
        return grad_x, grad_w, grad_b, None, None


def slab_conv3d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, groups: int = 1, slab_bytes: int = DEFAULT_SLAB_BYTES
) -> Tensor:
    """``F.conv3d(x, weight, bias, padding=kernel // 2, groups=groups)`` in depth slabs.

    Args:
        x: ``(B, C_in, D, H, W)``.
        weight: ``(C_out, C_in / groups, kd, kh, kw)``, odd kernel sizes ("same" padding).
        bias: ``(C_out,)`` or ``None``.
        groups: convolution groups.
        slab_bytes: input + output bytes one slab may span; a call that fits runs unsplit.
    """
    if x.dim() != 5:
        raise ValueError(f"slab_conv3d: expected (B, C, D, H, W), got {tuple(x.shape)}")
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"slab_conv3d: kernel sizes must be odd, got {tuple(weight.shape[2:])}")
    if slab_bytes < 1:
        raise ValueError(f"slab_conv3d: slab_bytes must be >= 1, got {slab_bytes}")
    if x.device.type != "cpu" and slab_bytes == DEFAULT_SLAB_BYTES:  # the default answers oneDNN (CPU only):
        slab_bytes = 2**31 * x.element_size()  # elsewhere split only what 32-bit indexing cannot hold
    plane = x.shape[0] * (x.shape[1] + weight.shape[0]) * x.shape[3] * x.shape[4] * x.element_size()
    planes = max(1, slab_bytes // max(plane, 1) - 2 * (weight.shape[2] // 2))
    padding = tuple(k // 2 for k in weight.shape[2:])
    if planes >= x.shape[2]:
        return F.conv3d(x, weight, bias, padding=padding, groups=groups)
    return apply_in_one_dtype(_SlabConv3dFunction, x, weight, bias, planes, groups)


def apply_in_one_dtype(function: Any, x: Tensor, weight: Tensor, bias: Tensor | None, *args: Any) -> Tensor:
    """``function.apply(x, weight, bias, *args)`` for a convolution node that evaluates in one dtype.

    Under autocast the inputs are cast as autocast would cast a convolution's, and the node runs with
    autocast off (its output buffer, or its rebuild in backward, has one dtype).
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return function.apply(x, weight, bias, *args)
    return function.apply(x, weight, bias, *args)


class SlabConv3d(nn.Conv3d):
    """``nn.Conv3d`` with "same" padding, stride 1, that runs large inputs in depth slabs.

    Same parameters and state dict as ``nn.Conv3d(in_channels, out_channels, kernel_size,
    padding=kernel_size // 2, bias=bias, groups=groups)``, so checkpoints of either load into the
    other.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (int or 3 ints).
        bias: learnable bias.
        groups: convolution groups.
        slab_bytes: input + output bytes per slab; see :func:`slab_conv3d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        bias: bool = True,
        groups: int = 1,
        slab_bytes: int = DEFAULT_SLAB_BYTES,
    ) -> None:
        ks = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(ks) != 3 or any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"SlabConv3d: kernel_size must be odd, got {kernel_size}")
        if slab_bytes < 1:
            raise ValueError(f"SlabConv3d: slab_bytes must be >= 1, got {slab_bytes}")
        super().__init__(in_channels, out_channels, ks, padding=tuple(k // 2 for k in ks), bias=bias, groups=groups)
        self.slab_bytes = slab_bytes

    def forward(self, x: Tensor) -> Tensor:
        return slab_conv3d(x, self.weight, self.bias, self.groups, self.slab_bytes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slab_bytes={self.slab_bytes}"
