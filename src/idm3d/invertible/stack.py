"""Invertible maps between *tuples* of tensors, so a segment can hold a U-Net's skip connections.

The state of a segment is a stack (a tuple whose last element is the top). ``ChannelSplit`` pops a
tensor and pushes two channel blocks (e.g. a skip and the part that goes on down),
``ChannelMerge`` pops two and pushes their concatenation, and ``Apply`` runs an
:class:`~idm3d.invertible.base.InvertibleModule` on one element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from idm3d.invertible.base import InvertibleModule

__all__ = ["Apply", "ChannelMerge", "ChannelSplit", "StackBackward", "StackOp"]

State = tuple[Tensor, ...]
# (rebuilt input state, dL/d(input state), dL/dcond, dL/dparams in grad_parameters order)
StackBackward = tuple[State, tuple[Tensor, ...], list[Tensor | None], list[Tensor | None]]


class StackOp(nn.Module):
    """An invertible map from a tuple of tensors to a tuple of tensors."""

    def forward(self, state: State, cond: Sequence[Tensor]) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, state: State, cond: Sequence[Tensor]) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward_pass(self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor]) -> StackBackward:
        """Rebuild the input state from the output ``state`` and backpropagate ``grads``."""
        raise NotImplementedError  # pragma: no cover - abstract

    @staticmethod
    def _index(state: State, index: int, name: str) -> int:
        if not -len(state) <= index < len(state):
            raise ValueError(f"{name}: stack index {index} out of range for a stack of {len(state)}")
        return index % len(state)


class Apply(StackOp):
    """Run ``module`` on element ``index`` of the stack (default: the top), leaving the rest."""

    def __init__(self, module: InvertibleModule, index: int = -1) -> None:
        super().__init__()
        if not isinstance(module, InvertibleModule):
            raise ValueError(f"Apply: expected an InvertibleModule, got {type(module).__name__}")
        self.module = module
        self.index = index

    def _replace(self, state: State, value: Tensor) -> State:
        i = self._index(state, self.index, "Apply")
        return (*state[:i], value, *state[i + 1 :])

    def forward(self, state: State, cond: Sequence[Tensor]) -> State:
        return self._replace(state, self.module(state[self._index(state, self.index, "Apply")], *cond))

    def inverse(self, state: State, cond: Sequence[Tensor]) -> State:
        return self._replace(state, self.module.inverse(state[self._index(state, self.index, "Apply")], *cond))

    def backward_pass(self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor]) -> StackBackward:
        i = self._index(state, self.index, "Apply")
        x, grad_x, grad_cond, grad_params = self.module.backward_pass(state[i], grads[i], cond)
        return self._replace(state, x), (*grads[:i], grad_x, *grads[i + 1 :]), grad_cond, grad_params


class ChannelSplit(StackOp):
    """Pop the top ``(B, a+b, ...)`` and push ``(B, a, ...)`` then ``(B, b, ...)``.

    Args:
        sizes: channel counts ``(a, b)``; the second block ends on top.
    """

    def __init__(self, sizes: tuple[int, int]) -> None:
        super().__init__()
        if len(sizes) != 2 or min(sizes) < 1:
            raise ValueError(f"ChannelSplit: sizes must be two positive channel counts, got {sizes}")
        self.sizes = tuple(int(s) for s in sizes)

    def _check(self, t: Tensor) -> None:
        if t.dim() < 2 or t.shape[1] != sum(self.sizes):
            raise ValueError(
                f"ChannelSplit: expected {sum(self.sizes)} channels on top of the stack, got shape {tuple(t.shape)}"
            )

    def forward(self, state: State, cond: Sequence[Tensor]) -> State:
        self._check(state[-1])
        a, b = torch.split(state[-1], self.sizes, dim=1)
        return (*state[:-1], a, b)

    def inverse(self, state: State, cond: Sequence[Tensor]) -> State:
        return (*state[:-2], torch.cat(state[-2:], dim=1))

    def backward_pass(self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor]) -> StackBackward:
        return self.inverse(state, cond), (*grads[:-2], torch.cat(tuple(grads[-2:]), dim=1)), [None] * len(cond), []


class ChannelMerge(StackOp):
    """Pop the two top elements ``(B, a, ...)``, ``(B, b, ...)`` and push their concatenation.

    Args:
        sizes: channel counts ``(a, b)`` of the two elements (the inverse splits them again).
    """

    def __init__(self, sizes: tuple[int, int]) -> None:
        super().__init__()
        self.split = ChannelSplit(sizes)

    def forward(self, state: State, cond: Sequence[Tensor]) -> State:
        top = state[-2:]
        if (
            len(top) < 2
            or min(t.dim() for t in top) < 2
            or tuple(t.shape[1] for t in top) != self.split.sizes
            or top[0].shape[:1] + top[0].shape[2:] != top[1].shape[:1] + top[1].shape[2:]
        ):
            got = tuple(tuple(t.shape) for t in top)
            raise ValueError(
                f"ChannelMerge: expected two tensors of {self.split.sizes} channels (other sizes equal) on top, "
                f"got {got}"
            )
        return self.split.inverse(state, cond)

    def inverse(self, state: State, cond: Sequence[Tensor]) -> State:
        return self.split.forward(state, cond)

    def backward_pass(self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor]) -> StackBackward:
        sizes = self.split.sizes
        return self.inverse(state, cond), (*grads[:-1], *torch.split(grads[-1], sizes, dim=1)), [None] * len(cond), []
