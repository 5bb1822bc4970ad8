"""The one memory-efficient switch, as the sub-networks of a segment see it while they run.

:class:`~idm3d.invertible.segment.InvertibleSequence` owns the switch (its ``memory_efficient``
attribute) and turns this mode on or off around everything it runs: its forward, and the rebuild
of its ops and head in backward. A sub-network asks :func:`lean_graph` when it builds a graph and
then takes its lean path (GroupNorm(-FiLM)-SiLU as one :func:`~idm3d.invertible.norm_act.group_norm_silu`
node, convolutions channels-last, inputs rebuilt instead of saved), so a hand-built segment gets the
same treatment as IDMUNet's core and no second flag has to be kept in step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["first_order_only", "hooked", "lean_graph", "memory_efficient_mode"]

_MEMORY_EFFICIENT: ContextVar[bool] = ContextVar("idm3d_memory_efficient", default=False)


@contextmanager
def memory_efficient_mode(enabled: bool = True) -> Iterator[None]:
    """Within the block, sub-networks that build a graph build their lean one (``enabled``) or the plain one.

    Args:
        enabled: the switch's value inside the block; the previous value comes back after it.
    """
    token = _MEMORY_EFFICIENT.set(bool(enabled))
    try:
        yield
    finally:
        _MEMORY_EFFICIENT.reset(token)


def lean_graph() -> bool:
    """Whether a sub-network should build its lean graph now: the mode is on and autograd records."""
    return _MEMORY_EFFICIENT.get() and torch.is_grad_enabled()


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """``once_differentiable`` for a custom Function's backward, refusing a graph-building backward at once.

    ``once_differentiable`` alone hangs its error on detached copies, so ``torch.autograd.grad(penalty,
    params, create_graph=True, allow_unused=True)`` would return ``None`` for the parameters instead of
    failing. Autograd records inside a backward only under ``create_graph=True``, so that is refused here.
    """
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "idm3d: the memory-efficient backward is first-order only (once_differentiable): "
                "create_graph=True (double backward, a gradient penalty) needs memory_efficient=False"
            )
        return inner(ctx, *grads)

    return wrapper


def hooked(model: torch.nn.Module) -> bool:
    """Whether a forward hook would watch any of ``model``'s modules.

    The no-grad in-place path (``forward_``) calls no module, so a hook (a user's feature tap, the trainer's
    non-finite diagnosis) would silently see nothing: with one present the ordinary path runs instead.
    """
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
