"""Additive coupling for 3D feature maps: ``y1 = x1``, ``y2 = x2 + F(x1, *cond)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from idm3d.invertible.base import BackwardResult, InvertibleModule, grad_parameters
from idm3d.invertible.norms import group_count
from idm3d.invertible.slab_conv import SlabConv3d

__all__ = ["AdditiveCoupling", "ConditionedConvNet"]


class ConditionedConvNet(nn.Module):
    """``F`` of a coupling: GroupNorm-SiLU-Conv, FiLM by a conditioning vector, GroupNorm-SiLU-Conv.

    GroupNorm rather than BatchNorm: a batch statistic would make the inverse depend on the batch.
    The last convolution starts at zero so a fresh coupling is the identity.

    Args:
        in_channels: channels of ``x1``.
        out_channels: channels of ``x2``.
        hidden_channels: width of the hidden layer.
        cond_dim: size of the conditioning vector (``(B, cond_dim)``), or ``None`` for none.
        kernel_size: spatial kernel size (odd).
        recompute_norms: recompute each GroupNorm(-FiLM)-SiLU in backward instead of storing its
            intermediate tensors (activation checkpointing of the cheap elementwise part): the
            graph then holds three feature maps instead of seven, for a few elementwise ops more.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int,
        cond_dim: int | None = None,
        kernel_size: int = 3,
        recompute_norms: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ConditionedConvNet: kernel_size must be odd, got {kernel_size}")
        self.cond_dim = cond_dim
        self.norm1 = nn.GroupNorm(group_count(in_channels), in_channels)
        self.conv1 = SlabConv3d(in_channels, hidden_channels, kernel_size)  # depth slabs at large sizes
        self.norm2 = nn.GroupNorm(group_count(hidden_channels), hidden_channels)
        self.film = nn.Linear(cond_dim, 2 * hidden_channels) if cond_dim else None
        self.conv2 = SlabConv3d(hidden_channels, out_channels, kernel_size)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.act = nn.SiLU()
        self.recompute_norms = recompute_norms

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        if self.recompute_norms and torch.is_grad_enabled():
            h = self.conv1(checkpoint(self._norm_act_in, x, use_reentrant=False))
            return self.conv2(checkpoint(self._norm_act_hidden, h, *cond, use_reentrant=False))
        return self.conv2(self._norm_act_hidden(self.conv1(self._norm_act_in(x)), *cond))

    def _norm_act_in(self, x: Tensor) -> Tensor:
        return self.act(self.norm1(x))

    def _norm_act_hidden(self, h: Tensor, *cond: Tensor) -> Tensor:
        h = self.norm2(h)
        if self.film is not None:
            if not cond:
                raise ValueError(f"ConditionedConvNet: expected a conditioning vector of size {self.cond_dim}")
            emb = cond[0]
            if emb.dim() != 2 or emb.shape[1] != self.cond_dim:
                raise ValueError(
                    f"ConditionedConvNet: expected conditioning of shape (B, {self.cond_dim}), "
                    f"got {tuple(emb.shape)}"
                )
            scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
            # one fused op: a full-resolution temporary fewer than h * (1 + scale) + shift
            h = torch.addcmul(shift, h, 1 + scale)
        return self.act(h)


class AdditiveCoupling(InvertibleModule):
    """Volume-preserving additive coupling over the channel axis.

    The channels split into ``x1`` (the first ``split`` channels, or the last ones when
    ``flip=True``) and ``x2``; ``y2 = x2 + F(x1, *cond)`` and ``y1 = x1``. Alternate ``flip`` in a
    stack so that every channel gets transformed (two one-sided couplings = a two-sided one).

    Args:
        channels: number of input (= output) channels, at least 2.
        hidden_channels: width of ``F``; defaults to ``channels``.
        cond_dim: size of a conditioning vector passed as ``cond[0]``, or ``None``.
        flip: transform the first part with ``F`` of the second instead.
        split: size of the conditioning part ``x1``; defaults to ``channels // 2``.
        kernel_size: spatial kernel size of ``F``.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int | None = None,
        cond_dim: int | None = None,
        flip: bool = False,
        split: int | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"AdditiveCoupling: needs at least 2 channels, got {channels}")
        split = channels // 2 if split is None else split
        if not 0 < split < channels:
            raise ValueError(f"AdditiveCoupling: split must be in [1, {channels - 1}], got {split}")
        self.channels = channels
        self.flip = flip
        # sizes of (x1, x2) in channel order of the tensor
        self.sizes = (channels - split, split) if flip else (split, channels - split)
        n_in, n_out = (self.sizes[1], self.sizes[0]) if flip else self.sizes
        self.net = ConditionedConvNet(n_in, n_out, hidden_channels or channels, cond_dim, kernel_size)

    def _halves(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return (conditioning half, transformed half)."""
        a, b = torch.split(t, self.sizes, dim=1)
        return (b, a) if self.flip else (a, b)

    def _join(self, kept: Tensor, changed: Tensor) -> Tensor:
        return torch.cat((changed, kept) if self.flip else (kept, changed), dim=1)

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(x, self.channels)
        x1, x2 = self._halves(x)
        return self._join(x1, x2 + self.net(x1, *cond))

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(y, self.channels)
        y1, y2 = self._halves(y)
        return self._join(y1, y2 - self.net(y1, *cond))

    def backward_pass(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        # x1 == y1, so the F(y1) the inverse needs is the very F(x1) the backward needs:
        # one evaluation of F with a graph serves both, making this cost what plain autograd costs.
        y1, y2 = self._halves(y)
        g1, g2 = self._halves(grad_y)
        x1 = y1.detach().requires_grad_(True)
        params = grad_parameters(self)
        wanted_cond = [c for c in cond if c.requires_grad]
        with torch.enable_grad():
            f = self.net(x1, *cond)
        x2 = y2 - f.detach()
        grads = torch.autograd.grad(f, [x1, *wanted_cond, *params], g2, allow_unused=True)
        grad_x1 = g1 if grads[0] is None else g1 + grads[0]
        cond_iter = iter(grads[1 : 1 + len(wanted_cond)])
        grad_cond = [next(cond_iter) if c.requires_grad else None for c in cond]
        return self._join(x1.detach(), x2), self._join(grad_x1, g2), grad_cond, list(grads[1 + len(wanted_cond) :])
