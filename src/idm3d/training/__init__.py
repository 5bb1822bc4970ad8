"""The training loop: ``train(config, run_dir)``, EMA, the non-finite and drift guards, DDP, progress.

What ``idm3d train`` calls. The run folder, config and checkpoints it writes are :mod:`idm3d.runs`;
sampling and evaluation are :mod:`idm3d.inference`. Names are imported lazily.
"""

from __future__ import annotations

from idm3d.lazy import lazy_exports

_EXPORTS = {
    "trainer": ("Trainer", "train"),
    "ema": ("EMA",),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

