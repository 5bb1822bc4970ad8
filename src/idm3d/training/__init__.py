"""Training engine, run configuration, checkpoints, and the train / sample / evaluate entry points.

``train(config, run_dir)``, ``sample(run_dir, out, ...)`` and ``evaluate(run_dir, ...)`` are what the
``idm3d train|sample|evaluate`` commands call. Names are imported lazily, so reading a config does not
import the data layer or the networks.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "config": ("Config", "load_config", "config_from_dict", "config_to_dict", "save_config"),
    "trainer": ("Trainer", "train"),
    "generate": ("sample",),
    "evaluation": ("evaluate", "train_baseline"),
    "run": ("load_run", "LoadedRun", "build_pipeline"),
    "rundir": ("RunDir",),
    "data_source": ("DataSource", "DemoSource", "FolderSource", "data_source"),
    "model_factory": ("build_model",),
    "checkpoint": ("TrainState", "load_checkpoint", "save_checkpoint", "latest_checkpoint"),
    "ema": ("EMA",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'idm3d.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"idm3d.training.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
