"""MONAI schedulers from a config, and the training target/loss matching each prediction type.

``epsilon`` (the paper's choice): the network predicts the added noise. ``sample``: it predicts the clean
volume x0. ``v_prediction``: it predicts v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0 (Salimans & Ho).
MONAI's ``DDPMScheduler.step``/``DDIMScheduler.step`` invert the same three parametrisations, so the
scheduler used for sampling must carry the prediction type used in training; :func:`build_scheduler`
does that from one config section, and the helpers below read it from the scheduler.

Errors are ``ValueError`` naming this module's own arguments (``kind``, ``num_inference_steps``...); the
training layer turns them into messages naming the config key.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules, Scheduler
from torch import Tensor

from idm3d.diffusion import flow
from idm3d.diffusion.solvers import FLOW_SOLVERS, FlowSolver
from idm3d.errors import ArgumentError

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULE_ALIASES",
    "build_scheduler",
    "diffusion_loss",
    "monai_schedule_name",
    "predict_epsilon",
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
        raise ArgumentError("schedule", f"expected one of {'|'.join(known)}, got {name!r}")
    return resolved


def build_scheduler(
    diffusion: object,
    kind: Literal["ddpm", "ddim", "euler", "heun"] | None = None,
    num_inference_steps: int | None = None,
) -> Scheduler:
    """Build a MONAI DDPM or DDIM scheduler from a ``DiffusionConfig``-like object, or a flow run's sampler.

    A ``diffusion.kind: rflow`` config gives MONAI's ``RFlowScheduler`` (``kind`` ``None``, training) or a
    :class:`~idm3d.diffusion.solvers.FlowSolver` (``kind`` ``euler``/``heun``, ``num_inference_steps`` network
    calls); DDPM samplers on a flow run and flow solvers on a DDPM run are refused (``kind``).

    Args:
        diffusion: has ``num_train_timesteps``, ``schedule``, ``beta_start``, ``beta_end``,
            ``prediction_type`` and ``clip_sample``.
        kind: ``ddpm`` (ancestral sampling, also the training scheduler) or ``ddim``.
        num_inference_steps: if given, ``set_timesteps`` is called (sampling); must be <= T.

    Raises:
        ArgumentError: unknown schedule, kind or prediction type, or too many inference steps (its
            ``argument`` names which).
    """
    if getattr(diffusion, "kind", "ddpm") == "rflow":
        return _build_flow(diffusion, kind, num_inference_steps)
    kind = "ddpm" if kind is None else kind
    if kind in FLOW_SOLVERS:
        raise ArgumentError("kind", f"expected ddpm|ddim, got {kind!r} (a flow solver; this run was trained with "
                            "diffusion.kind ddpm)")
    schedule = monai_schedule_name(diffusion.schedule)
    prediction_type = diffusion.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ArgumentError("prediction_type", f"expected one of {'|'.join(PREDICTION_TYPES)}, got {prediction_type!r}")
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
        raise ArgumentError("kind", f"expected ddpm|ddim, got {kind!r}")
    if num_inference_steps is not None:
        if not 1 <= num_inference_steps <= t_max:
            raise ArgumentError(
                "num_inference_steps", f"expected an integer in [1, {t_max}] (num_train_timesteps), "
                f"got {num_inference_steps}"
            )
        scheduler.set_timesteps(num_inference_steps)
    return scheduler


def _build_flow(diffusion: object, kind: str | None, calls: int | None) -> Scheduler:
    scheduler = flow.build_rflow_scheduler(diffusion)
    if kind is None:
        return scheduler
    if kind not in FLOW_SOLVERS:
        raise ArgumentError("kind", f"expected euler|heun, got {kind!r} (a DDPM sampler; this run was trained "
                            "with diffusion.kind rflow)")
    return FlowSolver(scheduler, kind, 1 if calls is None else calls,  # type: ignore[return-value]
                      clip=bool(getattr(diffusion, "clip_sample", False)))


def _prediction_type(scheduler: Scheduler, prediction_type: str | None) -> str:
    kind = scheduler.prediction_type if prediction_type is None else prediction_type
    if kind not in PREDICTION_TYPES:
        raise ArgumentError("prediction_type", f"expected one of {'|'.join(PREDICTION_TYPES)}, got {kind!r}")
    return kind


def _alpha_bar(scheduler: Scheduler, timesteps: Tensor, like: Tensor) -> Tensor:
    a = scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps.long().to(like.device)]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def training_target(
    scheduler: Scheduler, x0: Tensor, noise: Tensor, timesteps: Tensor, prediction_type: str | None = None
) -> Tensor:
    """What the network must output for ``x_t = add_noise(x0, noise, t)`` (default: the scheduler's type)."""
    if flow.is_flow(scheduler):
        return flow.flow_target(x0, noise, scheduler)
    kind = _prediction_type(scheduler, prediction_type)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, timesteps)


def predict_x0(
    scheduler: Scheduler, x_t: Tensor, output: Tensor, timesteps: Tensor, prediction_type: str | None = None
) -> Tensor:
    """The clean-volume estimate implied by a network ``output`` at ``x_t`` (inverse of :func:`training_target`)."""
    if flow.is_flow(scheduler):
        return flow.flow_x0(scheduler, x_t, output, timesteps)
    kind = _prediction_type(scheduler, prediction_type)
    a = _alpha_bar(scheduler, timesteps, x_t)
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "sample":
        return output
    return a.sqrt() * x_t - (1 - a).sqrt() * output


def predict_epsilon(
    scheduler: Scheduler, x_t: Tensor, output: Tensor, timesteps: Tensor, prediction_type: str | None = None
) -> Tensor:
    """The noise estimate implied by a network ``output`` at ``x_t`` (MONAI's DDIM step, formula for formula)."""
    if flow.is_flow(scheduler):
        return flow.flow_epsilon(scheduler, x_t, output, timesteps)
    kind = _prediction_type(scheduler, prediction_type)
    a = _alpha_bar(scheduler, timesteps, x_t)
    if kind == "epsilon":
        return output
    if kind == "sample":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()
    return a.sqrt() * output + (1 - a).sqrt() * x_t


def diffusion_loss(prediction: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Mean ``mse`` or ``l1`` between prediction and target, computed in float32 (autocast-safe)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
    p, t = prediction.float(), target.float()
    if kind == "mse":
        return F.mse_loss(p, t)
    if kind == "l1":
        return F.l1_loss(p, t)
    raise ArgumentError("loss", f"expected mse|l1, got {kind!r}")


def sample_timesteps(
    scheduler: Scheduler, batch: int, generator: torch.Generator | None = None, spatial: tuple[int, ...] | None = None
) -> Tensor:
    """Uniform training timesteps in ``[0, T)`` (int64), drawn from ``generator`` for reproducibility.

    A rectified-flow scheduler draws with its own ``sample_method`` and warp (``spatial``: the training grid).
    """
    if flow.is_flow(scheduler):
        return flow.sample_flow_timesteps(scheduler, batch, generator, spatial)
    return torch.randint(0, scheduler.num_train_timesteps, (batch,), generator=generator, dtype=torch.long)
