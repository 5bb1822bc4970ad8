"""Patch-size schedules: which patch size each training step uses (Patch Diffusion's stochastic mix).

Patch Diffusion (Wang et al., NeurIPS 2023, ``training_loop.py`` of its code) trains on a random mix of
patch sizes: with probability ``p = 0.5`` the full image, otherwise a half-size patch (probability
``(1 - p) 3/5 = 0.3``) or a quarter-size one (``(1 - p) 2/5 = 0.2``); every batch is of one size, and the
position channels tell the network where each patch lies. :data:`PATCH_DIFFUSION_MIX` is that mix as
``(edge scale, share)`` pairs; :func:`scaled_sizes` turns scales into patch sizes a network accepts.

A :class:`PatchSchedule` draws one size per step from the step's generator, so a run resumed at step
``s`` draws the sizes it would have drawn. Errors are ``ValueError`` naming ``schedule`` (the training
layer names the key, ``data.patch.schedule``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from idm3d.errors import ArgumentError

__all__ = ["PATCH_DIFFUSION_MIX", "PatchSchedule", "scaled_sizes"]

# (scale of every patch edge, share of the steps): Patch Diffusion's default (real_p = 0.5).
PATCH_DIFFUSION_MIX: tuple[tuple[float, float], ...] = ((1.0, 0.5), (0.5, 0.3), (0.25, 0.2))


def scaled_sizes(
    patch_size: Sequence[int], scales: Sequence[float], multiple: int = 1, smallest: int = 1
) -> list[tuple[int, ...]]:
    """Patch sizes ``scale * patch_size`` per axis, rounded down to ``multiple``, and at least ``smallest``
    (rounded up to ``multiple``) but never above ``patch_size``.

    Raises:
        ValueError: a scale outside (0, 1], or a multiple < 1.
    """
    if multiple < 1:
        raise ArgumentError("schedule", f"the size multiple must be >= 1, got {multiple}")
    floor = multiple * math.ceil(max(1, smallest) / multiple)
    sizes = []
    for scale in scales:
        if not 0.0 < float(scale) <= 1.0:
            raise ArgumentError("schedule",
                                f"a patch scale must be in (0, 1] (a share of data.patch_size), got {scale}")
        sizes.append(tuple(min(p, max(floor, math.floor(p * scale / multiple) * multiple)) for p in patch_size))
    return sizes


class PatchSchedule:
    """One patch size per training step, drawn with the given shares.

    Args:
        sizes: the candidate patch sizes (X, Y, Z).
        shares: the probability of each size (positive, summing to 1).
    """

    def __init__(self, sizes: Sequence[Sequence[int]], shares: Sequence[float]) -> None:
        if not sizes or len(sizes) != len(shares):
            raise ArgumentError("schedule", f"expected one share per patch size, got {len(sizes)} sizes and "
                             f"{len(shares)} shares")
        if any(not float(s) > 0.0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
            raise ArgumentError("schedule", f"the shares must be > 0 and sum to 1, got {list(shares)}")
        self.sizes = [tuple(int(p) for p in size) for size in sizes]
        self.shares = [float(s) for s in shares]
        self._cumulative = torch.tensor(self.shares, dtype=torch.float64).cumsum(0)

    @classmethod
    def fixed(cls, patch_size: Sequence[int]) -> PatchSchedule:
        """Every step at ``patch_size``."""
        return cls([patch_size], [1.0])

    @property
    def largest(self) -> tuple[int, ...]:
        """The per-axis largest size (what every volume must hold)."""
        return tuple(max(s[a] for s in self.sizes) for a in range(len(self.sizes[0])))

    def draw(self, generator: torch.Generator) -> tuple[int, ...]:
        """The size of one step; always one random number, so the generator advances the same way."""
        u = torch.rand((), generator=generator, dtype=torch.float64)
        index = int(torch.searchsorted(self._cumulative, u, right=True).clamp_max(len(self.sizes) - 1))
        return self.sizes[index]

    def describe(self) -> list[dict[str, object]]:
        """``[{"size": [...], "share": ...}, ...]`` for logs and reports."""
        return [{"size": list(s), "share": p} for s, p in zip(self.sizes, self.shares)]
