"""MONAI schedulers from a config, and the training target/loss matching each prediction type.

``epsilon`` (the paper's choice): the network predicts the added noise. ``sample``: it predicts the clean
volume x0. ``v_prediction``: it predicts v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (Salimans & Ho).
MONAI's ``DDPMScheduler.step``/``DDIMScheduler.step`` invert the same three parametrisations, so the
scheduler used for sampling must carry the prediction type used in training; :func:`build_scheduler`
does that from one config section.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules, Scheduler
from torch import Tensor

from idm3d.errors import ConfigError

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULE_ALIASES",
    "build_scheduler",
    "diffusion_loss",
    "monai_schedule_name",
    "predict_x0",
    "sample_timesteps",
    "training_target",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# Short names users know from papers -> MONAI 1.4+ NoiseSchedules names (which append "_beta").
SCHEDULE_ALIASES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "sigmoid": "sigmoid_beta"}


def monai_schedule_name(name: str) -> str:
    """Map a schedule name (``linear``, ``linear_beta``, ``cosine``...) to a MONAI ``NoiseSchedules`` member."""
    resolved = SCHEDULE_ALIASES.get(name, name)
    if resolved not in NoiseSchedules.names:
        known = sorted(set(NoiseSchedules.names) | set(SCHEDULE_ALIASES))
        raise ConfigError(f"diffusion.schedule: expected one of {'|'.join(known)}, got {name!r}")
    return resolved


def build_scheduler(
    diffusion: object,
    kind: Literal["ddpm", "ddim"] = "ddpm",
    num_inference_steps: int | None = None,
) -> Scheduler:
    """Build a MONAI DDPM or DDIM scheduler from a ``DiffusionConfig``-like object.

    Args:
        diffusion: has ``num_train_timesteps``, ``schedule``, ``beta_start``, ``beta_end``,
            ``prediction_type`` and ``clip_sample``.
        kind: ``ddpm`` (ancestral sampling, also the training scheduler) or ``ddim``.
        num_inference_steps: if given, ``set_timesteps`` is called (sampling); must be <= T.

    Raises:
        ConfigError: unknown schedule/kind/prediction type or too many inference steps.
    """
    schedule = monai_schedule_name(diffusion.schedule)
    prediction_type = diffusion.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"diffusion.prediction_type: expected one of {'|'.join(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
    t_max = int(diffusion.num_train_timesteps)
    # The cosine schedule takes no beta range; the beta schedules do.
    schedule_args = {} if schedule == "cosine" else {"beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end}
    common = {
        "num_train_timesteps": t_max,
        "schedule": schedule,
        "clip_sample": bool(diffusion.clip_sample),
        "prediction_type": prediction_type,
        **schedule_args,
    }
    if kind == "ddpm":
        scheduler: Scheduler = DDPMScheduler(**common)
    elif kind == "ddim":
        scheduler = DDIMScheduler(**common)
    else:
        raise ConfigError(f"sample.sampler: expected ddpm|ddim, got {kind!r}")
    if num_inference_steps is not None:
        if not 1 <= num_inference_steps <= t_max:
            raise ConfigError(
                f"sample.steps: expected an integer in [1, {t_max}] (diffusion.num_train_timesteps), "
                f"got {num_inference_steps}"
            )
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def training_target(
    scheduler: Scheduler, x0: Tensor, noise: Tensor, timesteps: Tensor, prediction_type: str
) -> Tensor:
    """What the network must output for ``x_t = add_noise(x0, noise, t)`` under ``prediction_type``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ConfigError(
        f"diffusion.prediction_type: expected one of {'|'.join(PREDICTION_TYPES)}, got {prediction_type!r}"
    )


def predict_x0(scheduler: Scheduler, x_t: Tensor, output: Tensor, timesteps: Tensor, prediction_type: str) -> Tensor:
    """The clean-volume estimate implied by a network ``output`` at ``x_t`` (inverse of :func:`training_target`)."""
    a = scheduler.alphas_cumprod.to(device=x_t.device, dtype=x_t.dtype)[timesteps.long().to(x_t.device)]
    a = a.reshape(-1, *([1] * (x_t.ndim - 1)))
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    raise ConfigError(
        f"diffusion.prediction_type: expected one of {'|'.join(PREDICTION_TYPES)}, got {prediction_type!r}"
    )


def diffusion_loss(prediction: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Mean ``mse`` or ``l1`` between prediction and target, computed in float32 (autocast-safe)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
    p, t = prediction.float(), target.float()
    if kind == "mse":
        return F.mse_loss(p, t)
    if kind == "l1":
        return F.l1_loss(p, t)
    raise ConfigError(f"diffusion.loss: expected mse|l1, got {kind!r}")


def sample_timesteps(scheduler: Scheduler, batch: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform training timesteps in ``[0, T)`` (int64), drawn from ``generator`` for reproducibility."""
    return torch.randint(0, scheduler.num_train_timesteps, (batch,), generator=generator, dtype=torch.long)
