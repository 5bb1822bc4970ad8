"""idm3d: 3D diffusion models on medical volumes with a memory-saving invertible denoiser."""

from __future__ import annotations

from typing import TYPE_CHECKING

from idm3d.lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from idm3d.diffusion.pipeline import DiffusionPipeline
    from idm3d.inference.generate import sample, sample_to_file
    from idm3d.nets.idm_unet import IDMUNet
    from idm3d.runs.config import load_config
    from idm3d.runs.load import LoadedRun, load_pipeline, load_run
    from idm3d.runs.model_factory import build_model_from_record
    from idm3d.training.trainer import train

# Lazy: importing idm3d.invertible or idm3d.errors should not pay for MONAI's import.
_names, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "nets.idm_unet": ("IDMUNet",),
        "diffusion.pipeline": ("DiffusionPipeline",),
        # a trained run folder -> model, scheduler, pipeline (safe loading only)
        "runs.load": ("LoadedRun", "load_pipeline", "load_run"),
        # a model.json (or a checkpoint's model metadata) -> the network, without a run folder
        "runs.model_factory": ("build_model_from_record",),
        # what `idm3d train` / `idm3d sample` call
        "runs.config": ("load_config",),
        "training.trainer": ("train",),
        "inference.generate": ("sample_to_file", "sample"),  # sample: deprecated alias of sample_to_file
    },
)
__all__ = [
    "DiffusionPipeline", "IDMUNet", "LoadedRun", "__version__", "build_model_from_record", "load_config",
    "load_pipeline", "load_run", "sample", "sample_to_file", "train",
]
