"""Additive coupling for 3D feature maps: ``y1 = x1``, ``y2 = x2 + F(x1, *cond)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from idm3d.invertible.base import BackwardResult, InvertibleModule, grad_parameters
from idm3d.invertible.inplace_ops import coupling_add_
from idm3d.invertible.mode import lean_graph
from idm3d.invertible.norm_act import group_norm_silu
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

    Under :func:`~idm3d.invertible.mode.memory_efficient_mode` (a memory-efficient segment turns it
    on while it rebuilds), a forward that builds a graph runs each GroupNorm(-FiLM)-SiLU as one
    autograd node that saves only its input and recomputes the rest in backward
    (:func:`~idm3d.invertible.norm_act.group_norm_silu`), and the first convolution's input is
    rebuilt from ``x`` instead of saved: fewer feature maps in the graph and in its backward, for a
    few elementwise ops more. Outside it the plain modules run.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int,
        cond_dim: int | None = None,
        kernel_size: int = 3,
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

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:
        fused = lean_graph()
        if not fused or torch.is_autocast_enabled(x.device.type):
            return self.conv2(self._norm_act_hidden(self.conv1(self._norm_act_in(x, fused)), *cond, fused=fused))
        # The first convolution's input is not kept: its backward rebuilds it from x (one cheap
        # GroupNorm-SiLU), so that map is not alive through the second convolution's backward.
        a = self._norm_act_in(x, fused)
        with _rebuilt_on_unpack(a, lambda: self._norm_act_in(x.detach(), fused), x):
            h = self.conv1(a)
        del a
        return self.conv2(self._norm_act_hidden(h, *cond, fused=fused))

    def _norm_act_in(self, x: Tensor, fused: bool) -> Tensor:
        # fused (memory-efficient): the convolutions run channels-last, no reordered copies
        return group_norm_silu(x, self.norm1, channels_last=True) if fused else self.act(self.norm1(x))

    def _norm_act_hidden(self, h: Tensor, *cond: Tensor, fused: bool = False) -> Tensor:
        if self.film is None:
            return group_norm_silu(h, self.norm2) if fused else self.act(self.norm2(h))
        scale, shift = self._film(h, cond)
        if fused:
            return group_norm_silu(h, self.norm2, 1 + scale, shift)
        # one fused op: a full-resolution temporary fewer than h * (1 + scale) + shift
        return self.act(torch.addcmul(shift, self.norm2(h), 1 + scale))

    def _film(self, h: Tensor, cond: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        assert self.film is not None
        if not cond:
            raise ValueError(f"ConditionedConvNet: expected a conditioning vector of size {self.cond_dim}")
        emb = cond[0]
        if emb.dim() != 2 or emb.shape[1] != self.cond_dim:
            raise ValueError(
                f"ConditionedConvNet: expected conditioning of shape (B, {self.cond_dim}), got {tuple(emb.shape)}"
            )
        scale, shift = self.film(emb)[:, :, None, None, None].chunk(2, dim=1)
        return scale, shift


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

    reuses_buffers = True

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

    def forward_(self, x: Tensor, *cond: Tensor) -> Tensor:
        # no graph: F(x1) goes straight into x2's channels, large F in depth slabs (inplace_ops)
        self.check_input(x, self.channels)
        x1, x2 = self._halves(x)
        coupling_add_(self.net, x1, x2, cond)
        return x

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:
        self.check_input(y, self.channels)
        y1, y2 = self._halves(y)
        return self._join(y1, y2 - self.net(y1, *cond))

    def backward_pass(
        self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor], reuse: tuple[bool, bool] = (False, False)
    ) -> BackwardResult:
        # x1 == y1, so the F(y1) the inverse needs is the very F(x1) the backward needs:
        # one evaluation of F with a graph serves both, making this cost what plain autograd costs.
        reuse_y, reuse_grad = reuse
        y1, y2 = self._halves(y)
        g1, g2 = self._halves(grad_y)
        # Reusing y, x2 = y2 - F goes into y's memory before F's backward runs and F's output is
        # freed then; x1 needs a version counter of its own for that (the write leaves its
        # channels alone, but autograd counts writes per buffer).
        x1 = (_alias(y1) if reuse_y else y1.detach()).requires_grad_(True)
        params = grad_parameters(self)
        wanted_cond = [c for c in cond if c.requires_grad]
        with torch.enable_grad():
            f = self.net(x1, *cond)
        root: Tensor | torch.autograd.graph.GradientEdge = f
        if reuse_y:
            root = torch.autograd.graph.get_gradient_edge(f)
            with torch.no_grad():
                y2.sub_(f)
            del f
        grads = torch.autograd.grad(root, [x1, *wanted_cond, *params], g2, allow_unused=True)
        x = y if reuse_y else self._join(x1.detach(), y2 - root.detach())  # type: ignore[union-attr]
        rest = list(grads[1:])
        if reuse_grad:
            if grads[0] is not None:
                with torch.no_grad():
                    g1.add_(grads[0])
            grad_x = grad_y
            rest = [_unaliased(g, grad_y) for g in rest]  # later ops overwrite grad_y
        else:
            grad_x = self._join(g1 if grads[0] is None else g1 + grads[0], g2)
        cond_iter = iter(rest[: len(wanted_cond)])
        grad_cond = [next(cond_iter) if c.requires_grad else None for c in cond]
        return x, grad_x, grad_cond, rest[len(wanted_cond) :]


def _rebuilt_on_unpack(
    target: Tensor, rebuild: Callable[[], Tensor], source: Tensor
) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks that keep ``target`` out of the graph and call ``rebuild`` when backward needs it.

    ``rebuild`` computes it from ``source``; a write to ``source`` in between is an error, as for
    any saved tensor.
    """
    version = source._version
    # the hooks outlive the forward (autograd keeps them with the saved tensor): no reference to target
    key = (target.data_ptr(), target.shape, target.stride())

    def pack(t: Tensor) -> Tensor | tuple[()]:
        return () if (t.data_ptr(), t.shape, t.stride()) == key else t

    def unpack(packed: Tensor | tuple[()]) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        if source._version != version:
            raise RuntimeError("ConditionedConvNet: its input was modified in place before backward")
        with torch.no_grad():
            return rebuild()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _alias(t: Tensor) -> Tensor:
    """A new tensor over ``t``'s memory, with a version counter of its own."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _unaliased(g: Tensor | None, buffer: Tensor) -> Tensor | None:
    if g is not None and g.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
        return g.clone()
    return g
