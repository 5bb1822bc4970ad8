"""idm3d: 3D diffusion models on medical volumes with a memory-saving invertible denoiser."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DiffusionPipeline", "IDMUNet", "LoadedRun", "__version__", "load_config", "load_run", "sample", "train",
]

if TYPE_CHECKING:
    from idm3d.diffusion.pipeline import DiffusionPipeline
    from idm3d.nets.idm_unet import IDMUNet
    from idm3d.training.config import load_config
    from idm3d.training.generate import sample
    from idm3d.training.run import LoadedRun, load_run
    from idm3d.training.trainer import train

# Lazy: importing idm3d.invertible or idm3d.errors should not pay for MONAI's import.
_LAZY = {
    "IDMUNet": "idm3d.nets.idm_unet",
    "DiffusionPipeline": "idm3d.diffusion.pipeline",
    "load_run": "idm3d.training.run",  # a trained run folder -> model, scheduler, pipeline (safe loading only)
    "LoadedRun": "idm3d.training.run",
    # what `idm3d train` / `idm3d sample` call
    "load_config": "idm3d.training.config",
    "train": "idm3d.training.trainer",
    "sample": "idm3d.training.generate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'idm3d' has no attribute {name!r}")
