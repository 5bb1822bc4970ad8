"""A segment of invertible modules that stores only its output.

``InvertibleSequence(ops, memory_efficient=True)`` runs its forward without building a graph and
keeps just the output state and the conditioning tensors. In backward it walks the ops in
reverse: each rebuilds its input from its output and backpropagates (see
``InvertibleModule.backward_pass``), so activation memory does not grow with depth. With
``memory_efficient=False`` the very same modules run under plain autograd: the reference for
tests and for debugging.

Backward works in place where it may: memory the caller owns (the incoming gradient, a returned
output) is only read; the buffers backward makes are handed to the ops as writable, so a coupling
rebuilds its input and gradient in its output's memory, and a skip join refills the buffer it was
split from. With ``head=`` (a non-invertible output block run inside the segment's node) the
segment output is private too: see ``InvertibleSequence``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from idm3d.invertible.base import InvertibleModule, grad_parameters
from idm3d.invertible.mode import first_order_only, hooked, memory_efficient_mode
from idm3d.invertible.record import Record, recording
from idm3d.invertible.rng import RngState, forked
from idm3d.invertible.stack import Apply, StackOp

__all__ = ["InvertibleSequence"]

State = tuple[Tensor, ...]


class _Layout(NamedTuple):
    """What ``_SegmentFunction`` needs besides the tensors; ``args`` follow it in this order."""

    segment: InvertibleSequence
    head: nn.Module | None
    n_state: int
    n_cond: int
    n_params: int


# _SegmentFunction.apply(layout, *state, *cond, *params, *head_params): the inputs before the tensors
_LEADING = 1


class _SegmentFunction(torch.autograd.Function):
    """Forward without a graph; backward by inversion. Inputs: state, cond, parameters, head parameters."""

    @staticmethod
    def forward(ctx, layout: _Layout, *args: Tensor) -> State:  # type: ignore[override]
        segment, head, n_state, n_cond, n_params = layout
        state, cond = tuple(args[:n_state]), tuple(args[n_state : n_state + n_cond])
        params = args[n_state + n_cond : n_state + n_cond + n_params]
        # The parameters this node differentiates, as forward saw them: backward adds each op's
        # gradients into these slots and refuses parameters that changed in between.
        slot = {id(p): i for i, p in enumerate(params)}
        ctx.ops, ctx.params = tuple(segment.ops), params
        ctx.versions = [p._version for p in args[n_state + n_cond :]]  # head parameters included
        ctx.slots = [[slot[id(p)] for p in grad_parameters(op)] for op in ctx.ops]
        # A random op must draw in backward's rebuild what it drew here (torch.utils.checkpoint's
        # preserve_rng_state): the generators' state before each op, and before the head.
        rng: list[RngState] | None = [] if segment.preserve_rng_state else None
        # Values the sub-networks made with a collective (on depth shards), one slot per op and one
        # for the head: the rebuild replays them instead of communicating again (invertible/record.py)
        record = Record()
        with memory_efficient_mode(True), recording(record):
            out = segment._run(state, cond, rng, record)
        # backward must evaluate every sub-network exactly as forward did (same autocast state),
        # or the rebuilt inputs would differ from the true ones by the precision gap.
        device_type = state[0].device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        # Outputs that are views (a split at the end) would alias each other for autograd.
        out = tuple(t.clone() if t._base is not None else t for t in out)
        ctx.head, ctx.n_state, ctx.n_cond, ctx.n_out = head, n_state, n_cond, len(out)
        ctx.head_params = args[n_state + n_cond + n_params :]
        inputs = {_storage(t) for t in state}
        # Behind a head the segment output is private: backward may rebuild activations in its
        # memory (never in memory of an input, which the caller owns).
        ctx.reuse = tuple(head is not None and _storage(t) not in inputs for t in out)
        ctx.save_for_backward(*out, *cond)
        if rng is not None and head is not None:
            rng.append(RngState.capture(*out))
        ctx.rng = rng
        if head is not None:
            record.op = len(ctx.ops)
            with memory_efficient_mode(True), recording(record):
                result = head(*out)
        ctx.record = record if record else None  # nothing kept (an unsharded net): nothing to replay
        if head is None:
            return out
        result = (result,) if isinstance(result, Tensor) else tuple(result)
        private = inputs | {_storage(t) for t in out}
        return tuple(r.clone() if r._base is not None or _storage(r) in private else r for r in result)

    @staticmethod
    @first_order_only  # the rebuild is not itself differentiable: refuse double backward
    def backward(ctx, *grad_out: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        outputs, cond_inputs = saved[: ctx.n_out], saved[ctx.n_out :]
        _check_versions((*ctx.params, *ctx.head_params), ctx.versions)
        needs = ctx.needs_input_grad[_LEADING:]
        cond_needs = needs[ctx.n_state : ctx.n_state + ctx.n_cond]
        cond = [c.detach().requires_grad_(bool(n)) for c, n in zip(cond_inputs, cond_needs)]
        # Memory the caller owns (the incoming gradients, which autograd may share with other
        # nodes, and a returned output) is never written; buffers made by this backward are
        # handed on as writable, so an op can rebuild its input and gradient in place.
        kept = [t for t, reuse in zip(outputs, ctx.reuse) if not reuse]
        foreign = {_storage(t) for t in (*kept, *cond_inputs, *grad_out) if t is not None}
        rng: list[RngState] | None = ctx.rng
        record: Record | None = ctx.record
        if record is not None:
            record.replay = True
        # The replay leaves the caller's random stream as it was.
        with _forked(rng, *outputs, *cond_inputs), memory_efficient_mode(True), recording(record):
            grads, grad_cond, grad_params, grad_head = _rebuild(ctx, outputs, grad_out, cond, foreign)
        ctx.record = None  # freed slot by slot already; a second backward (retained graph) computes again
        grad_state = [g if n else None for g, n in zip(grads, needs[: ctx.n_state])]
        return (*(None,) * _LEADING, *grad_state, *grad_cond, *grad_params, *grad_head)


def _rebuild(
    ctx: Any, outputs: Sequence[Tensor], grad_out: Sequence[Tensor], cond: Sequence[Tensor], foreign: set[int]
) -> tuple[tuple[Tensor, ...], list[Tensor | None], list[Tensor | None], list[Tensor | None]]:
    """Walk the head and the ops in reverse: the gradients of the state, cond, parameters and head parameters."""
    rng: list[RngState] | None = ctx.rng
    record: Record | None = ctx.record
    state = tuple(t.detach() for t in outputs)
    grads: tuple[Tensor, ...] = tuple(grad_out)
    grad_head: list[Tensor | None] = []
    if ctx.head is not None:
        if rng is not None:
            rng[-1].restore()
        _replay(record, len(ctx.ops))
        with _autocast(ctx.autocast):
            grads, grad_head = _head_backward(ctx.head, state, ctx.head_params, grad_out)
        _replay(record, None)
    grad_cond: list[Tensor | None] = [None] * len(cond)
    grad_params: list[Tensor | None] = [None] * len(ctx.params)
    for i in reversed(range(len(ctx.ops))):
        op, slots = ctx.ops[i], ctx.slots[i]
        writable = tuple((_writable(t, foreign), _writable(g, foreign)) for t, g in zip(state, grads))
        if rng is not None:
            rng[i].restore()
        _replay(record, i)
        with _autocast(ctx.autocast):
            state, grads, g_cond, g_params = op.backward_pass(state, grads, cond, writable)
        _replay(record, None)
        if len(g_params) != len(slots):
            raise RuntimeError(
                f"InvertibleSequence: op {i} ({type(op).__name__}) has {len(g_params)} parameters that take "
                f"gradients now, {len(slots)} at forward; set requires_grad before the forward, not between"
            )
        grad_cond = [_add(a, b) for a, b in zip(grad_cond, g_cond)]
        for j, g in zip(slots, g_params):
            grad_params[j] = _add(grad_params[j], g)
    return grads, grad_cond, grad_params, grad_head


def _replay(record: Record | None, op: int | None) -> None:
    """Replay slot ``op`` of ``record`` next (``None``: free the slot just replayed)."""
    if record is None:
        return
    if op is None:
        record.drop(record.op)
    else:
        record.op = op


def _check_versions(params: Sequence[Tensor], versions: Sequence[int]) -> None:
    """Backward rebuilds from the current parameter values: refuse any written since forward."""
    if any(p._version != v for p, v in zip(params, versions)):
        raise RuntimeError(
            "InvertibleSequence: a parameter was modified in place between forward and backward "
            "(e.g. optimizer.step() before backward); the memory-efficient backward would rebuild wrong activations"
        )


def _forked(rng: list[RngState] | None, *tensors: Tensor) -> contextlib.AbstractContextManager:
    return forked(*tensors) if rng is not None else contextlib.nullcontext()


def _autocast(spec: tuple[str, bool, torch.dtype]) -> torch.autocast:
    device_type, enabled, dtype = spec
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _head_backward(
    head: nn.Module, state: State, params: Sequence[Tensor], grad_out: Sequence[Tensor]
) -> tuple[tuple[Tensor, ...], list[Tensor | None]]:
    """Recompute ``head(*state)`` with a graph; the gradients w.r.t. ``state`` and ``params``."""
    inputs = tuple(t.detach().requires_grad_(True) for t in state)
    with torch.enable_grad():
        result = head(*inputs)
    result = (result,) if isinstance(result, Tensor) else tuple(result)
    pairs = [(r, g) for r, g in zip(result, grad_out) if r.requires_grad]
    grads = torch.autograd.grad(
        [r for r, _ in pairs], [*inputs, *params], [g for _, g in pairs], allow_unused=True
    ) if pairs else (None,) * (len(inputs) + len(params))
    grad_state = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))
    return grad_state, list(grads[len(inputs) :])


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
            plain autograd through the same modules (``False``; for debugging and reference). This
            one switch drives every part: the segment runs its ops and head under
            :func:`~idm3d.invertible.mode.memory_efficient_mode` set to it, so sub-networks take
            their lean path (fused GroupNorm-SiLU nodes) exactly when the segment rebuilds.
        preserve_rng_state: save the random generators' state before each op (and the head) at
            forward and restore it for that op's rebuild in backward, as
            ``torch.utils.checkpoint`` does, so a random layer (``nn.Dropout`` in training mode)
            draws the same numbers twice and the gradients equal plain autograd's. ``False``
            skips the save where no op draws random numbers.

    Call it as ``seq(x, *cond)`` with ``x`` a tensor or a tuple of tensors (the state stack); it
    returns a tensor when the final state holds one, else a tuple. ``cond`` tensors (e.g. a
    timestep embedding) go to every op, are kept and receive gradients.

    ``seq(x, *cond, head=module)`` returns ``module(*final_state)`` instead, ``module`` being any
    (non-invertible) network, e.g. a U-Net's output block. Memory-efficient, it runs inside the
    segment's autograd node: its activations are recomputed in backward (as under activation
    checkpointing), and because the segment output is then never handed out, the backward
    rebuilds activations in that output's memory and in the gradient the head produces, instead
    of keeping both, as it must for a returned output and for autograd's incoming gradient.

    Limits of the memory-efficient backward: it is not differentiable again (a double backward,
    e.g. a gradient penalty through ``create_graph=True``, raises); behind a head a second backward
    through a retained graph raises (the first rebuilt activations in the output's memory); the
    parameters must not be modified in place between forward and backward (that raises too).
    """

    def __init__(
        self, ops: Iterable[nn.Module], memory_efficient: bool = True, preserve_rng_state: bool = True
    ) -> None:
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
        self.preserve_rng_state = preserve_rng_state

    def _unique_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for op in self.ops:
            for p in grad_parameters(op):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _run(
        self, state: State, cond: Sequence[Tensor], rng: list[RngState] | None = None, record: Record | None = None
    ) -> State:
        """Apply the ops.

        Args:
            state: the input state.
            cond: the conditioning tensors.
            rng: a list to append the generators' state before each op to, or ``None``.
            record: where op ``i``'s layers keep their values (its slot ``i``), or ``None``.
        """
        for i, op in enumerate(self.ops):
            if rng is not None:
                rng.append(RngState.capture(*state, *cond))
            if record is not None:
                record.op = i
            state = op(state, cond)
        return state

    @staticmethod
    def _as_state(x: Tensor | Sequence[Tensor]) -> State:
        return (x,) if isinstance(x, Tensor) else tuple(x)

    def forward(self, x: Tensor | Sequence[Tensor], *cond: Tensor, head: nn.Module | None = None) -> Tensor | State:
        state = self._as_state(x)
        params = self._unique_parameters()
        head_params = grad_parameters(head) if head is not None else []
        wants_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in (*state, *cond)) or len(params) + len(head_params) > 0
        )
        if not torch.is_grad_enabled() and not hooked(self):
            # No graph: the ops update the state in place (the caller's tensors are copied first).
            out = self.forward_(tuple(t.clone() for t in state), *cond)
            if head is not None:
                return head(*out)
        elif self.memory_efficient and wants_grad:
            layout = _Layout(self, head, len(state), len(cond), len(params))
            out = _SegmentFunction.apply(layout, *state, *cond, *params, *head_params)
        else:
            with memory_efficient_mode(self.memory_efficient):
                out = self._run(state, cond)
                if head is not None:
                    return head(*out)
        return out[0] if len(out) == 1 else tuple(out)

    @torch.no_grad()
    def forward_(self, x: Tensor | Sequence[Tensor], *cond: Tensor) -> State:
        """The no-grad forward over memory the caller hands over: each op writes its result in place.

        Couplings add into their halves, resamplings write over their input, skip joins are views
        (see :mod:`~idm3d.invertible.inplace`), so the state stays in the buffers it came in and
        the only new memory is each op's working maps. Returns the final state (a tuple).
        """
        state = self._as_state(x)
        with memory_efficient_mode(self.memory_efficient):
            for op in self.ops:
                state = op.forward_(state, cond)
        return state

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
