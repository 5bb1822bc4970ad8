"""A training preview: a short sample (the run's own sampler) with the EMA weights on a fixed training patch.

What TensorBoard shows under ``preview/`` at each checkpoint (``train.log.preview_every``): the patch's
sources (translation), its real targets, and the targets the EMA model samples, each as mid-slices.
The patch, the noise and the chain are fixed by ``train.seed``, so successive previews differ only by
the weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from idm3d.runs.config import Config
from idm3d.runs.data_source import TrainingData, step_batch
from idm3d.runs.load import build_pipeline, build_scheduler
from idm3d.training.ema import EMA

__all__ = ["preview_volumes"]


@torch.no_grad()
def preview_volumes(
    cfg: Config, model: nn.Module, ema: EMA, data: TrainingData, device: torch.device
) -> dict[str, Tensor]:
    """``{"source_<m>" | "target_<m>" | "sample_<m>": (X, Y, Z) CPU tensor}`` for the first patch of step 0."""
    target, source, position = step_batch(data, 0)
    target, source = target[:1], None if source is None else source[:1]
    position = None if position is None else position[:1]
    averaged = copy.deepcopy(model)  # the training model keeps its weights and mode
    ema.copy_to(averaged)
    averaged.eval()
    pipeline = build_pipeline(cfg, averaged, device, precision=cfg.train.precision)
    steps = min(cfg.train.log.preview_steps, cfg.diffusion.num_train_timesteps)
    sampled = pipeline.sample(
        tuple(target.shape), None if source is None else source.to(device),
        scheduler=build_scheduler(cfg, _preview_sampler(cfg), steps),
        generator=torch.Generator().manual_seed(cfg.train.seed),
        device=device, position=position,
    ).cpu()
    out: dict[str, Tensor] = {}
    if source is not None:
        out.update({f"source_{m}": source[0, i] for i, m in enumerate(cfg.data.sources)})
    out.update({f"target_{m}": target[0, i] for i, m in enumerate(cfg.data.targets)})
    out.update({f"sample_{m}": sampled[0, i] for i, m in enumerate(cfg.data.targets)})
    return out


def _preview_sampler(cfg: Config) -> str:
    """The run's own sampler; a DDPM-sampler run previews with DDIM (DDPM with few steps is mostly noise)."""
    return "ddim" if cfg.sample.sampler == "ddpm" else str(cfg.sample.sampler)
