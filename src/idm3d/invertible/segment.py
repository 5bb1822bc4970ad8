"""A segment of invertible modules that stores only its output.

``InvertibleSequence(ops, memory_efficient=True)`` runs its forward without building a graph and
keeps just the output state and the conditioning tensors. In backward it walks the ops in
reverse: each rebuilds its input from its output and backpropagates (see
``InvertibleModule.backward_pass``), so activation memory does not grow with depth. With
``memory_efficient=False`` the very same modules run under plain autograd: the reference for
tests and for debugging.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from idm3d.invertible.base import InvertibleModule, grad_parameters
from idm3d.invertible.stack import Apply, StackOp

__all__ = ["InvertibleSequence"]

State = tuple[Tensor, ...]


class _SegmentFunction(torch.autograd.Function):
    """Forward without a graph; backward by inversion. Inputs: state, cond, then parameters."""

    @staticmethod
    def forward(ctx, segment: InvertibleSequence, n_state: int, n_cond: int, *args: Tensor) -> State:  # type: ignore[override]
        state, cond = tuple(args[:n_state]), tuple(args[n_state : n_state + n_cond])
        out = segment._run(state, cond)
        # backward must evaluate every sub-network exactly as forward did (same autocast state),
        # or the rebuilt inputs would differ from the true ones by the precision gap.
        device_type = state[0].device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        # Outputs that are views (a split at the end) would alias each other for autograd.
        out = tuple(t.clone() if t._base is not None else t for t in out)
        inputs = {_storage(t) for t in state}
        # never an output that is (memory of) an input: the caller owns that
        ctx.reuse = tuple(segment.reuse_output and _storage(t) not in inputs for t in out)
        ctx.segment, ctx.n_state, ctx.n_cond, ctx.n_out = segment, n_state, n_cond, len(out)
        ctx.save_for_backward(*out, *cond)
        return out

    @staticmethod
    def backward(ctx, *grad_out: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        state = tuple(t.detach() for t in saved[: ctx.n_out])
        cond_inputs = saved[ctx.n_out :]
        needs = ctx.needs_input_grad[3:]
        cond_needs = needs[ctx.n_state : ctx.n_state + ctx.n_cond]
        cond = [c.detach().requires_grad_(bool(n)) for c, n in zip(cond_inputs, cond_needs)]
        grads = tuple(grad_out)
        grad_cond: list[Tensor | None] = [None] * len(cond)
        params = ctx.segment._unique_parameters()
        slot = {id(p): i for i, p in enumerate(params)}
        grad_params: list[Tensor | None] = [None] * len(params)
        device_type, enabled, dtype = ctx.autocast
        # Memory the caller owns (the incoming gradients, which autograd may share with other
        # nodes, and the output unless ``reuse_output``) is never written; buffers made by this
        # backward are handed on as writable, so an op can rebuild its input and gradient in place.
        kept = [t for t, reuse in zip(saved[: ctx.n_out], ctx.reuse) if not reuse]
        foreign = {_storage(t) for t in (*kept, *cond_inputs, *grad_out) if t is not None}
        for op in reversed(ctx.segment.ops):
            writable = tuple((_writable(t, foreign), _writable(g, foreign)) for t, g in zip(state, grads))
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                state, grads, g_cond, g_params = op.backward_pass(state, grads, cond, writable)
            grad_cond = [_add(a, b) for a, b in zip(grad_cond, g_cond)]
            for p, g in zip(grad_parameters(op), g_params):
                grad_params[slot[id(p)]] = _add(grad_params[slot[id(p)]], g)
        grad_state = [g if n else None for g, n in zip(grads, needs[: ctx.n_state])]
        return (None, None, None, *grad_state, *grad_cond, *grad_params)


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _writable(t: Tensor | None, foreign: set[int]) -> bool:
    """Made by this backward (not caller memory) and free of broadcast (zero-stride) dimensions."""
    if t is None or _storage(t) in foreign:
        return False
    return all(st != 0 or n == 1 for st, n in zip(t.stride(), t.shape))


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class InvertibleSequence(nn.Module):
    """A sequence of invertible ops that can rebuild its activations instead of storing them.

    Args:
        ops: :class:`InvertibleModule` s (applied to the top of the state stack) or
            :class:`~idm3d.invertible.stack.StackOp` s.
        memory_efficient: store only the output and rebuild inputs in backward (``True``), or run
            plain autograd through the same modules (``False``; for debugging and reference).
        reuse_output: let the memory-efficient backward rebuild activations in the memory of the
            segment's output, one output-sized buffer less for the whole backward. The output
            tensor then holds other values after backward: only for an output nothing reads once
            backward has run (IDMUNet's core). A second backward through the same graph raises
            autograd's in-place modification error instead of computing wrong gradients.

    Call it as ``seq(x, *cond)`` with ``x`` a tensor or a tuple of tensors (the state stack); it
    returns a tensor when the final state holds one, else a tuple. ``cond`` tensors (e.g. a
    timestep embedding) go to every op, are kept and receive gradients.
    """

    def __init__(self, ops: Iterable[nn.Module], memory_efficient: bool = True, reuse_output: bool = False) -> None:
        super().__init__()
        wrapped = []
        for op in ops:
            if isinstance(op, InvertibleModule):
                op = Apply(op)
            if not isinstance(op, StackOp):
                raise ValueError(f"InvertibleSequence: expected invertible modules, got {type(op).__name__}")
            wrapped.append(op)
        self.ops = nn.ModuleList(wrapped)
        self.memory_efficient = memory_efficient
        self.reuse_output = reuse_output

    def _unique_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for op in self.ops:
            for p in grad_parameters(op):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _run(self, state: State, cond: Sequence[Tensor]) -> State:
        for op in self.ops:
            state = op(state, cond)
        return state

    @staticmethod
    def _as_state(x: Tensor | Sequence[Tensor]) -> State:
        return (x,) if isinstance(x, Tensor) else tuple(x)

    def forward(self, x: Tensor | Sequence[Tensor], *cond: Tensor) -> Tensor | State:
        state = self._as_state(x)
        params = self._unique_parameters()
        wants_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in (*state, *cond)) or len(params) > 0
        )
        if self.memory_efficient and wants_grad:
            out = _SegmentFunction.apply(self, len(state), len(cond), *state, *cond, *params)
        else:
            out = self._run(state, cond)
        return out[0] if len(out) == 1 else tuple(out)

    def inverse(self, y: Tensor | Sequence[Tensor], *cond: Tensor) -> Tensor | State:
        state = self._as_state(y)
        for op in reversed(self.ops):
            state = op.inverse(state, cond)
        return state[0] if len(state) == 1 else state

    @torch.no_grad()
    def reconstruction_error(self, x: Tensor | Sequence[Tensor], *cond: Tensor) -> list[float]:
        """Max abs error of each op's input as backward would rebuild it (chained from the output).

        This is the drift a memory-efficient backward sees: entry ``i`` compares the true input of
        op ``i`` with the one reached by inverting every op from the segment output down to ``i``.
        """
        inputs = []
        state = self._as_state(x)
        for op in self.ops:
            inputs.append(state)
            state = op(state, cond)
        errors = [0.0] * len(self.ops)
        for i in reversed(range(len(self.ops))):
            state = self.ops[i].inverse(state, cond)
            errors[i] = max(float((a - b).abs().max()) for a, b in zip(state, inputs[i]))
        return errors
