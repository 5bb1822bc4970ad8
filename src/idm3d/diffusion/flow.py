"""Rectified flow (flow matching) over MONAI's ``RFlowScheduler``, used as it is.

MONAI's convention, which MAISI trains with (``diff_model_train.py``): with ``s = t / T``,

* ``add_noise``: ``x_t = (1 - s) * x0 + s * noise`` (``t = 0`` clean, ``t = T`` pure noise);
* the network predicts the velocity ``v = x0 - noise`` (the opposite sign of diffusers'/SD3's);
* ``step(v, t, x, t_next)`` moves ``x`` from ``t`` to ``t_next < t``: ``x + v * (t - t_next) / T`` (Euler).

MONAI names that prediction ``"v_prediction"``, which for the DDPM schedulers means Salimans & Ho's
``v = sqrt(a) * noise - sqrt(1 - a) * x0``: another quantity. idm3d therefore calls the flow's prediction
type ``flow`` (:data:`FLOW_PREDICTION`), reads it through :func:`prediction_kind`, and never lets the
``v_prediction`` string alone decide which maths applies.

An x0-parametrised flow (``diffusion.prediction_type: sample`` with ``kind: rflow``): the network predicts
the clean volume and is trained on it (as the demo's DDPM runs are); its velocity is
``v = (x0_hat - x_t) / s``, so one Euler step from ``t`` to ``t'`` is ``x_t' = (s'/s) x_t + (1 - s'/s) x0_hat``
(DDIM's update on the flow's straight path). The solvers never call it at ``s = 0``
(:mod:`idm3d.diffusion.solvers`). The run's scheduler carries which output its network gives
(:func:`flow_output`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.schedulers import RFlowScheduler, Scheduler
from torch import Tensor

from idm3d.errors import ArgumentError

__all__ = [
    "FLOW_PREDICTION",
    "SAMPLE_METHODS",
    "build_rflow_scheduler",
    "flow_epsilon",
    "flow_output",
    "flow_target",
    "flow_velocity",
    "flow_x0",
    "is_flow",
    "prediction_kind",
    "sample_flow_timesteps",
]

FLOW_PREDICTION = "flow"
SAMPLE_METHODS = ("uniform", "logit-normal")


def is_flow(scheduler: object) -> bool:
    """Whether ``scheduler`` is a rectified-flow scheduler (or a flow solver wrapping one)."""
    return isinstance(scheduler, RFlowScheduler) or isinstance(getattr(scheduler, "scheduler", None), RFlowScheduler)


def prediction_kind(scheduler: object) -> str:
    """What a network trained with ``scheduler`` predicts: ``flow`` for rectified flow, else the DDPM type."""
    return FLOW_PREDICTION if is_flow(scheduler) else str(scheduler.prediction_type)  # type: ignore[attr-defined]


def build_rflow_scheduler(diffusion: object) -> RFlowScheduler:
    """MONAI's ``RFlowScheduler`` from a ``DiffusionConfig``-like object.

    Reads ``num_train_timesteps``, ``sample_method`` (``uniform`` | ``logit-normal`` training timesteps),
    ``use_timestep_transform`` (MONAI's resolution warp: more time near noise for volumes larger than
    ``base_img_size_numel`` voxels) and ``base_img_size_numel``.

    Raises:
        ArgumentError: an unknown ``sample_method``.
    """
    method = getattr(diffusion, "sample_method", "uniform")
    if method not in SAMPLE_METHODS:
        raise ArgumentError("sample_method", f"expected one of {'|'.join(SAMPLE_METHODS)}, got {method!r}")
    scheduler = RFlowScheduler(
        num_train_timesteps=int(diffusion.num_train_timesteps),  # type: ignore[attr-defined]
        use_discrete_timesteps=True,  # MAISI's setting: integer timesteps, as the DDPM runs feed the network
        sample_method=method,
        use_timestep_transform=bool(getattr(diffusion, "use_timestep_transform", False)),
        base_img_size_numel=int(getattr(diffusion, "base_img_size_numel", 32 * 32 * 32)),
        spatial_dim=3,
    )
    # MONAI's scheduler as it is, told what the network outputs (its own prediction_type string is MONAI's)
    scheduler.idm3d_output = "x0" if getattr(diffusion, "prediction_type", None) == "sample" else "velocity"
    return scheduler


def flow_output(scheduler: object) -> str:
    """``velocity`` (MONAI/MAISI's ``x0 - noise``) or ``x0``: what a flow run's network outputs."""
    inner = getattr(scheduler, "scheduler", scheduler)
    return getattr(inner, "idm3d_output", "velocity")


def _s(scheduler: RFlowScheduler, timesteps: Tensor, like: Tensor) -> Tensor:
    s = timesteps.to(device=like.device, dtype=like.dtype) / scheduler.num_train_timesteps
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def flow_target(x0: Tensor, noise: Tensor, scheduler: object = None) -> Tensor:
    """What the network learns: the velocity ``x0 - noise`` (MONAI/MAISI sign), or ``x0`` (x0-parametrised)."""
    return x0 if flow_output(scheduler) == "x0" else x0 - noise


def flow_velocity(scheduler: RFlowScheduler, x_t: Tensor, output: Tensor, timesteps: Tensor) -> Tensor:
    """The velocity of a network ``output`` at ``x_t``: the output itself, or ``(x0_hat - x_t) / s`` (``s > 0``)."""
    if flow_output(scheduler) != "x0":
        return output
    return (output - x_t) / _s(scheduler, timesteps, x_t).clamp_min(1.0 / scheduler.num_train_timesteps)


def flow_x0(scheduler: RFlowScheduler, x_t: Tensor, v: Tensor, timesteps: Tensor) -> Tensor:
    """The clean-volume estimate of an output at ``x_t``: ``x_t + s * v`` (MONAI's ``pred_original_sample``)."""
    if flow_output(scheduler) == "x0":
        return v
    return x_t + _s(scheduler, timesteps, x_t) * v


def flow_epsilon(scheduler: RFlowScheduler, x_t: Tensor, v: Tensor, timesteps: Tensor) -> Tensor:
    """The noise estimate of an output at ``x_t``: ``x_t - (1 - s) * v`` for the velocity ``v``."""
    return x_t - (1 - _s(scheduler, timesteps, x_t)) * flow_velocity(scheduler, x_t, v, timesteps)


def sample_flow_timesteps(
    scheduler: RFlowScheduler, batch: int, generator: torch.Generator | None = None,
    spatial: Sequence[int] | None = None,
) -> Tensor:
    """Training timesteps from MONAI's ``RFlowScheduler.sample_timesteps``, reproducible from ``generator``.

    MONAI draws from the global RNG; the draw runs under a forked global RNG seeded from ``generator``,
    so a run's timesteps depend on its seed and step only (as the DDPM runs' do) and the caller's RNG state
    is untouched. ``spatial`` is the training volume's grid (the timestep warp depends on its size).
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    grid = tuple(int(s) for s in spatial) if spatial is not None else (32, 32, 32)
    like = torch.zeros(1).expand(batch, 1, *grid)  # MONAI reads only its batch size, grid and device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t = scheduler.sample_timesteps(like)
    return t if t.is_floating_point() else t.long()


def check_scheduler(scheduler: Scheduler) -> RFlowScheduler:
    """``scheduler`` if it is a flow scheduler, else an ``ArgumentError`` naming the mismatch."""
    if not isinstance(scheduler, RFlowScheduler):
        raise ArgumentError("scheduler", f"expected a RFlowScheduler, got {type(scheduler).__name__}")
    return scheduler
