"""What one training step draws and returns: its seeds, one per random stream, and its :class:`StepResult`.

Everything random in step ``i`` comes from generators seeded by ``(train.seed, i, stream)``, so a resumed
run draws exactly what an uninterrupted one draws (:mod:`idm3d.training.trainer`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["STREAM_INIT", "STREAM_NOISE", "STREAM_TORCH", "StepResult", "step_seed"]

# Independent random streams of one step.
STREAM_NOISE, STREAM_TORCH, STREAM_INIT = 1, 2, 3


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, step, stream)``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, step, stream]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@dataclasses.dataclass
class StepResult:
    """Outcome of one optimisation step (``skipped`` when loss or gradients were non-finite)."""

    loss: float
    grad_norm: float
    skipped: bool
    overflow: bool = False  # skipped on an fp16 gradient overflow at a loss scale > 1 (not a fault)
