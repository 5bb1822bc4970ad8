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
from idm3d.invertible.inplace import adjacent_join

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

    def forward_(self, state: State, cond: Sequence[Tensor]) -> State:
        """The no-grad forward, which may write over the state's tensors (the caller hands them over)."""
        return self.forward(state, cond)

    def backward_pass(
        self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor], writable: Sequence[tuple[bool, bool]] = ()
    ) -> StackBackward:
        """Rebuild the input state from the output ``state`` and backpropagate ``grads``.

        ``writable[i]``: whether ``state[i]`` and ``grads[i]`` are memory the caller no longer needs,
        so the op may rebuild its input and gradient there (empty: none is).
        """
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

    def forward_(self, state: State, cond: Sequence[Tensor]) -> State:
        return self._replace(state, self.module.forward_(state[self._index(state, self.index, "Apply")], *cond))

    def inverse(self, state: State, cond: Sequence[Tensor]) -> State:
        return self._replace(state, self.module.inverse(state[self._index(state, self.index, "Apply")], *cond))

    def backward_pass(
        self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor], writable: Sequence[tuple[bool, bool]] = ()
    ) -> StackBackward:
        i = self._index(state, self.index, "Apply")
        reuse = tuple(writable[i]) if i < len(writable) else (False, False)
        if self.module.reuses_buffers and any(reuse):
            x, grad_x, grad_cond, grad_params = self.module.backward_pass(state[i], grads[i], cond, reuse=reuse)
        else:
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

    def backward_pass(
        self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor], writable: Sequence[tuple[bool, bool]] = ()
    ) -> StackBackward:
        reuse_x, reuse_grad = tuple(writable[-2]) if len(writable) >= 2 else (False, False)
        x = _join_in_place(state) if reuse_x else None
        g = _join_in_place(tuple(grads)) if reuse_grad else None
        x = torch.cat(state[-2:], dim=1) if x is None else x
        g = torch.cat(tuple(grads[-2:]), dim=1) if g is None else g
        return (*state[:-2], x), (*grads[:-2], g), [None] * len(cond), []


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

    def forward_(self, state: State, cond: Sequence[Tensor]) -> State:
        # the skip and the part that came back up are neighbouring channels of one buffer when
        # everything below ran in place: the join is then a wider view, no copy
        joined = adjacent_join(*state[-2:]) if len(state) >= 2 else None
        return self.forward(state, cond) if joined is None else (*state[:-2], joined)

    def inverse(self, state: State, cond: Sequence[Tensor]) -> State:
        return self.split.forward(state, cond)

    def backward_pass(
        self, state: State, grads: Sequence[Tensor], cond: Sequence[Tensor], writable: Sequence[tuple[bool, bool]] = ()
    ) -> StackBackward:
        sizes = self.split.sizes
        return self.inverse(state, cond), (*grads[:-1], *torch.split(grads[-1], sizes, dim=1)), [None] * len(cond), []


def _channel_block(t: Tensor, base: Tensor) -> tuple[int, int] | None:
    """``(first, last + 1)`` channel of ``base`` when ``t`` is ``base[:, first:last + 1]``, else ``None``."""
    if (
        t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
        or t.dim() != base.dim()
        or t.stride() != base.stride()
        or t.dtype != base.dtype
        or t.shape[:1] + t.shape[2:] != base.shape[:1] + base.shape[2:]
    ):
        return None
    offset = t.storage_offset() - base.storage_offset()
    if offset < 0 or offset % base.stride(1):
        return None
    first = offset // base.stride(1)
    return (first, first + t.shape[1]) if first + t.shape[1] <= base.shape[1] else None


def _join_in_place(entries: tuple[Tensor, ...]) -> Tensor | None:
    """``cat(entries[-2:], dim=1)`` built in the buffer the first of them is the leading channels of.

    After a merge's split, the skip (``entries[-2]``) is ``buffer[:, :a]`` and the channels after
    it held the other half, which a resampling then replaced by a new tensor: those channels are
    scratch unless another entry still covers them. The second part is copied there and the
    joined state is a view of that buffer, so no new full-size tensor is made and the old buffer
    (e.g. a segment output) is not kept alive next to one. ``None`` where that does not apply.
    """
    a, b = entries[-2:]
    base = a if a._base is None else a._base
    block = _channel_block(a, base)
    if block is None or block[0] != 0 or not base.is_contiguous() or b.dtype != a.dtype:
        return None
    start, stop = a.shape[1], a.shape[1] + b.shape[1]
    if stop > base.shape[1] or b.shape[:1] + b.shape[2:] != a.shape[:1] + a.shape[2:]:
        return None
    in_place = _channel_block(b, base) == (start, stop)
    for t in (*entries[:-2], *(() if in_place else (b,))):
        if t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            continue
        other = _channel_block(t, base)
        if other is None or (other[0] < stop and start < other[1]):
            return None  # the channels after the skip are still in use
    joined = base[:, :stop]
    if not in_place:
        joined[:, start:stop].copy_(b)
    return joined
