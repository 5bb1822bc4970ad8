"""Learnable orthogonal 3D down/upsampling (iUNet-style) and orthogonal 1x1x1 channel mixing.

Downsampling is a stride-2 convolution with a 2x2x2 kernel per channel; the 8 kernels of a channel
are the rows of an orthogonal 8x8 matrix, so the map (non-overlapping patches) is orthogonal and
its exact inverse is the transposed convolution. The orthogonal matrix is ``W0 @ Q(A)`` with
``W0`` the 3D Haar basis (the initialisation) and ``Q`` the Cayley transform or matrix exponential
of a skew-symmetric ``A`` (zero at start): any optimizer step keeps it orthogonal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idm3d.invertible import linalg
from idm3d.invertible.base import InvertibleModule
from idm3d.invertible.inplace_ops import resample_in_place

__all__ = [
    "InvertibleChannelMix3d",
    "OrthogonalDownsample3d",
    "OrthogonalUpsample3d",
    "haar_matrix_3d",
    "orthogonal_from_skew",
]


def haar_matrix_3d(dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal 8x8 3D Haar basis (tensor product of the 2-point Haar transform)."""
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    return torch.kron(torch.kron(h, h), h).to(dtype)


def orthogonal_from_skew(raw: Tensor, method: str) -> Tensor:
    """Map unconstrained ``raw`` (..., n, n) to orthogonal matrices via ``A = raw - raw^T``."""
    skew = raw - raw.transpose(-1, -2)
    if method == "exp":
        return torch.linalg.matrix_exp(skew)
    if method == "cayley":
        eye = torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device).expand_as(skew)
        # (I + A)^-1 (I - A): orthogonal for skew-symmetric A; I + A is never singular. The 8x8
        # batches are below the size where CPU batched LU fails, but one safe path serves all sizes.
        return linalg.solve(eye + skew, eye - skew)
    raise ValueError(f"orthogonal parametrisation must be 'cayley' or 'exp', got {method!r}")


def _grouped_conv(x: Tensor, kernel: Tensor, groups: int, transpose: bool) -> Tensor:
    """Stride-2 grouped (transposed) convolution in the input's dtype, never autocast.

    An orthogonal map computed in bf16/fp16 is orthogonal only to ~1e-2, which its inverse would
    turn into drift; the map is cheap, so it always runs in the precision of the state.
    """
    with torch.autocast(x.device.type, enabled=False):
        conv = F.conv_transpose3d if transpose else F.conv3d
        return conv(x, kernel.to(x.dtype), stride=2, groups=groups)


class _OrthogonalKernel(nn.Module):
    """Per-channel orthogonal 8x8 matrices ``W0 @ Q(A)``, exposed as a grouped 2x2x2 conv kernel."""

    def __init__(self, channels: int, method: str) -> None:
        super().__init__()
        if method not in ("cayley", "exp"):
            raise ValueError(f"method must be 'cayley' or 'exp', got {method!r}")
        self.channels = channels
        self.method = method
        self.raw = nn.Parameter(torch.zeros(channels, 8, 8))

    def matrices(self) -> Tensor:
        """(C, 8, 8) orthogonal matrices; row k of channel c is that channel's k-th kernel."""
        # Built in float64 each call (8x8, negligible): a cast buffer would carry fp32 rounding
        # into an fp64 model and break exact orthogonality there.
        haar = haar_matrix_3d(torch.float64).to(device=self.raw.device, dtype=self.raw.dtype)
        with torch.autocast(self.raw.device.type, enabled=False):  # a bf16 matmul here breaks orthogonality
            return haar @ orthogonal_from_skew(self.raw, self.method)

    def kernel(self) -> Tensor:
        return self.matrices().reshape(self.channels * 8, 1, 2, 2, 2)


class OrthogonalDownsample3d(InvertibleModule):
    """``(B, C, D, H, W) -> (B, 8C, D/2, H/2, W/2)``, orthogonal, learnable, Haar at start.

    Args:
        channels: input channels ``C``.
        method: ``"cayley"`` or ``"exp"`` parametrisation of the orthogonal matrices.
    """

    def __init__(self, channels: int, method: str = "cayley") -> None:
        super().__init__()
        self.channels = channels
        self.weight = _OrthogonalKernel(channels, method)

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(x, self.channels, even=True)
        return _grouped_conv(x, self.weight.kernel(), self.channels, transpose=False)

    def forward_(self, x: Tensor, *cond: Tensor) -> Tensor:
        # no graph: the result is written over x, a few channels at a time (inplace_ops)
        self.check_input(x, self.channels, even=True)
        out = resample_in_place(x, self.weight.kernel(), self.channels, transpose=False)
        return self.forward(x) if out is None else out

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(y, 8 * self.channels)
        return _grouped_conv(y, self.weight.kernel(), self.channels, transpose=True)


class OrthogonalUpsample3d(InvertibleModule):
    """``(B, 8C, D, H, W) -> (B, C, 2D, 2H, 2W)``: the exact inverse map of a downsampling.

    Args:
        channels: output channels ``C`` (the input has ``8C``).
        method: ``"cayley"`` or ``"exp"``.
    """

    def __init__(self, channels: int, method: str = "cayley") -> None:
        super().__init__()
        self.channels = channels
        self.weight = _OrthogonalKernel(channels, method)

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(x, 8 * self.channels)
        return _grouped_conv(x, self.weight.kernel(), self.channels, transpose=True)

    def forward_(self, x: Tensor, *cond: Tensor) -> Tensor:
        # no graph: the result is written over x, a few channels at a time (inplace_ops)
        self.check_input(x, 8 * self.channels)
        out = resample_in_place(x, self.weight.kernel(), self.channels, transpose=True)
        return self.forward(x) if out is None else out

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(y, self.channels, even=True)
        return _grouped_conv(y, self.weight.kernel(), self.channels, transpose=False)


class InvertibleChannelMix3d(InvertibleModule):
    """Orthogonal 1x1x1 channel mixing ``y = W x`` (inverse ``W^T``), identity at start.

    Args:
        channels: number of channels.
        method: ``"cayley"`` or ``"exp"``.
    """

    def __init__(self, channels: int, method: str = "cayley") -> None:
        super().__init__()
        if method not in ("cayley", "exp"):
            raise ValueError(f"method must be 'cayley' or 'exp', got {method!r}")
        self.channels = channels
        self.method = method
        self.raw = nn.Parameter(torch.zeros(channels, channels))

    def matrix(self) -> Tensor:
        return orthogonal_from_skew(self.raw, self.method)

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        with torch.autocast(x.device.type, enabled=False):  # orthogonal only in the state's precision
            return torch.einsum("oc,bcdhw->bodhw", self.matrix().to(x.dtype), x)

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(y, self.channels)
        with torch.autocast(y.device.type, enabled=False):
            return torch.einsum("co,bcdhw->bodhw", self.matrix().to(y.dtype), y)
