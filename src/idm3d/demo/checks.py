"""A diagnostic for the demo report: the same sampling and scoring on a slab the net was trained on.

Comparing it with the held-out band separates underfitting (both scores low) from a generalisation gap
between brain regions (the training slab clearly better).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from idm3d.data.demo import DemoData
from idm3d.errors import ConfigError
from idm3d.metrics import evaluate_pair
from idm3d.runs.load import load_run

__all__ = ["score_training_slab", "training_slab"]


def training_slab(demo: DemoData, depth: int) -> range:
    """The top ``depth`` axial slices of the training region (the ones nearest the held-out band)."""
    stop = demo.train_slices.stop
    if depth > stop - demo.train_slices.start:
        raise ConfigError(f"training slab: {depth} slices do not fit the training region {demo.train_slices}")
    return range(stop - depth, stop)


def score_training_slab(
    run_dir: str | Path, demo: DemoData, slab: range, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Sample slab ``slab`` of the training region with a run's settings (as ``evaluate`` would) and score it."""
    run = load_run(run_dir, device=device)
    source, target = run.sources[0], run.targets[0]
    z = slice(slab.start, slab.stop)
    truth, mask = demo.record.channel(target)[0][..., z], demo.mask[0][..., z]
    pred = run.masked(run.infer(condition=demo.record.channel(source)[..., z][None])[0, 0], mask)
    return {"slices_z": [slab.start, slab.stop], **evaluate_pair(pred, truth, mask=mask)}
