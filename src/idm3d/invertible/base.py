"""The contract every invertible module follows.

An invertible module maps a tensor ``x`` to ``y`` given optional conditioning tensors ``cond``
(a timestep embedding, a condition map...). Conditioning is an *extra input*: it is never
reconstructed, never freed, and receives gradients.

Besides ``forward`` and ``inverse`` a module offers ``backward_pass``: given the output ``y`` and
the gradient of the loss w.r.t. ``y`` it rebuilds ``x`` and returns every gradient. The default
implementation inverts without a graph, then recomputes the forward with one; modules that can
do better (an additive coupling evaluates its sub-network once) override it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from idm3d.invertible.rng import forked

__all__ = ["BackwardResult", "InvertibleModule", "grad_parameters"]

# (rebuilt input, dL/dx, dL/dcond per cond tensor, dL/dparam per grad_parameters(module))
BackwardResult = tuple[Tensor, Tensor, list[Tensor | None], list[Tensor | None]]


def grad_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` that take gradients, in a fixed order."""
    return [p for p in module.parameters() if p.requires_grad]


class InvertibleModule(nn.Module):
    """Base class: ``y = forward(x, *cond)`` and ``x = inverse(y, *cond)`` exactly.

    A subclass whose ``backward_pass`` takes ``reuse=(reuse_y, reuse_grad)`` (it may then build ``x``
    in the memory of ``y``, and ``dL/dx`` in that of ``dL/dy``, which the caller no longer needs)
    sets ``reuses_buffers = True``; a segment passes it only for memory it may overwrite.
    """

    reuses_buffers = False

    def forward(self, x: Tensor, *cond: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: Tensor, *cond: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_(self, x: Tensor, *cond: Tensor) -> Tensor:
        """The no-grad forward, which may write over ``x`` (the caller hands its memory over).

        The default computes ``forward`` and, where the shape is kept, copies the result back into
        ``x``: the state stays in its buffer, so a later skip join is still a view there.
        """
        y = self.forward(x, *cond)
        if y.shape == x.shape and y.dtype == x.dtype and 0 not in x.stride():
            return x.copy_(y)
        return y

    def log_det(self, x: Tensor, *cond: Tensor) -> Tensor:
        """Per-sample ``log|det dy/dx|``, shape ``(B,)``. Volume-preserving modules return zeros."""
        return x.new_zeros(x.shape[0])

    def backward_pass(self, y: Tensor, grad_y: Tensor, cond: Sequence[Tensor]) -> BackwardResult:
        """Rebuild the input from ``y`` and backpropagate ``grad_y`` through this module.

        Args:
            y: the module's output, detached.
            grad_y: gradient of the loss w.r.t. ``y``.
            cond: conditioning tensors (detached leaves; those with ``requires_grad`` get gradients).

        Returns:
            ``(x, grad_x, grad_cond, grad_params)``; ``grad_params`` follows ``grad_parameters(self)``.
        """
        # on a fork of the random generators: the forward below draws what the inverse drew
        with torch.no_grad(), forked(y, *cond):
            x = self.inverse(y, *cond)
        x = x.detach().requires_grad_(True)
        params = grad_parameters(self)
        wanted_cond = [c for c in cond if c.requires_grad]
        with torch.enable_grad():
            y_graph = self.forward(x, *cond)
        grads = torch.autograd.grad(
            y_graph, [x, *wanted_cond, *params], grad_y, allow_unused=True
        )
        grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x)
        cond_iter = iter(grads[1 : 1 + len(wanted_cond)])
        grad_cond = [next(cond_iter) if c.requires_grad else None for c in cond]
        return x.detach(), grad_x, grad_cond, list(grads[1 + len(wanted_cond) :])

    def check_input(self, x: Tensor, channels: int | None = None, even: bool = False) -> None:
        """Raise a ``ValueError`` naming what was expected and what came, before torch does."""
        name = type(self).__name__
        if x.dim() != 5:
            raise ValueError(f"{name}: expected a 5D tensor (B, C, D, H, W), got shape {tuple(x.shape)}")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"{name}: expected {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if even and any(s % 2 for s in x.shape[2:]):
            raise ValueError(f"{name}: expected even spatial sizes, got {tuple(x.shape[2:])}")
