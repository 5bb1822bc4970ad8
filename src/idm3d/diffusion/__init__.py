"""Diffusion over MONAI: schedulers, prediction types and their targets, the pipeline (loss, sample, invert)."""

from __future__ import annotations

from idm3d.diffusion.coordinates import coordinate_channels, position_of
from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.diffusion.sampling import denoise_fn, sample
from idm3d.diffusion.schedule import (
    PREDICTION_TYPES,
    build_scheduler,
    diffusion_loss,
    monai_schedule_name,
    predict_epsilon,
    predict_x0,
    sample_timesteps,
    training_target,
)

__all__ = [
    "PREDICTION_TYPES",
    "DiffusionPipeline",
    "build_scheduler",
    "coordinate_channels",
    "denoise_fn",
    "diffusion_loss",
    "monai_schedule_name",
    "position_of",
    "predict_epsilon",
    "predict_x0",
    "sample",
    "sample_timesteps",
    "training_target",
]
