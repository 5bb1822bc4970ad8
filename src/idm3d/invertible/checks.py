"""Self-checks for memory-saving segments (the minREV habit): compare with plain autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from idm3d.invertible.segment import InvertibleSequence

__all__ = ["gradient_check"]


def gradient_check(
    segment: InvertibleSequence, x: Tensor | Sequence[Tensor], *cond: Tensor, seed: int = 0
) -> dict[str, float]:
    """Relative gradient error of the memory-efficient backward against plain autograd.

    Backpropagates the same random projection of the output both ways and compares the gradients
    of the inputs, the conditioning tensors and every parameter.

    Returns:
        ``{"input": ..., "cond": ..., "params": ...}``: max of ``|g_me - g_plain| / |g_plain|``
        (``0.0`` where a group is empty).
    """
    state = (x,) if isinstance(x, Tensor) else tuple(x)
    leaves = [t.detach().requires_grad_(True) for t in state]
    cond_leaves = [c.detach().requires_grad_(True) for c in cond]
    params = segment._unique_parameters()
    gen = torch.Generator().manual_seed(seed)
    flag = segment.memory_efficient
    results = []
    try:
        for mode in (True, False):
            segment.memory_efficient = mode
            out = segment(leaves[0] if isinstance(x, Tensor) else tuple(leaves), *cond_leaves)
            outs = (out,) if isinstance(out, Tensor) else out
            if not results:
                weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
            loss = sum((o * w).sum() for o, w in zip(outs, weights))
            results.append(torch.autograd.grad(loss, [*leaves, *cond_leaves, *params], allow_unused=True))
    finally:
        segment.memory_efficient = flag

    def rel(a: Tensor | None, b: Tensor | None) -> float:
        if a is None or b is None:
            return 0.0 if a is None and b is None else float("inf")
        return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))

    groups = {"input": range(len(leaves)), "cond": range(len(leaves), len(leaves) + len(cond_leaves))}
    groups["params"] = range(len(leaves) + len(cond_leaves), len(results[0]))
    return {k: max((rel(results[0][i], results[1][i]) for i in idx), default=0.0) for k, idx in groups.items()}
