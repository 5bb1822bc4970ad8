"""Self-checks for memory-saving segments (the minREV habit): compare with plain autograd."""

from __future__ import annotations

import math
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
        ``{"input": ..., "cond": ..., "params": ...}``: ``|g_me - g_plain| / |g_plain|`` over each group's
        gradients taken together (``0.0`` where a group is empty, ``inf`` where only one side has a
        gradient).
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

    def rel(idx: range) -> float:
        # Per group, not per tensor: a tensor whose true gradient vanishes (a conv bias right before a
        # GroupNorm of one channel per group) holds rounding noise only, and noise/noise is ~1.
        pairs = [(results[0][i], results[1][i]) for i in idx]
        if any((a is None) != (b is None) for a, b in pairs):
            return float("inf")
        pairs = [(a, b) for a, b in pairs if a is not None]
        diff = math.hypot(*(float((a - b).norm()) for a, b in pairs))
        ref = math.hypot(*(float(b.norm()) for _, b in pairs))
        return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))

    groups = {"input": range(len(leaves)), "cond": range(len(leaves), len(leaves) + len(cond_leaves))}
    groups["params"] = range(len(leaves) + len(cond_leaves), len(results[0]))
    return {k: rel(idx) for k, idx in groups.items()}
