"""Few-step ODE solvers for rectified-flow runs, counted in network calls.

A flow run samples by integrating ``dx/dt`` from pure noise (``t = T``) to data (``t = 0``) on the time grid
of MONAI's ``RFlowScheduler.set_timesteps`` (its resolution warp included). The user-facing count is the
number of **network calls** ``N``, whatever the solver, because a call is what costs (71 s for a 256³
volume on 2 CPU cores):

* ``euler``: ``N`` steps of one call each, each step MONAI's ``RFlowScheduler.step``;
* ``heun``: ``S = floor(N / 2) + 1`` steps on the same kind of grid. Heun steps (two calls: an Euler
  predictor, then the trapezoid of the two velocities, again through MONAI's ``step``) everywhere except

  - the last step, landing on the data, which is a plain Euler step (as in EDM's sampler, so that no call
    is spent on the velocity at ``t = 0``), and
  - with ``N`` even, the first step (from pure noise) as well, as DPM-Solver's multistep methods also
    begin with a first-order step.

  So ``N = 2k + 1`` calls are ``k`` Heun steps + Euler and ``N = 2k`` calls are Euler + ``k - 1`` Heun
  steps + Euler: ``N = 1``: E; ``2``: E E; ``3``: H E; ``4``: E H E; ``5``: H H E; ``6``: E H H E.
  Every call is made at a time ``t > 0``. The velocity's limit at ``t = 0`` is singular for data on a thin
  set (a brain's constant background): off the data it grows like ``1/t``, so a corrector evaluated there
  at the predicted volume is the worst-conditioned call of the chain (the earlier schedule, whose even
  counts ended with one, gave a held-out SSIM of 0.20 at 2 calls where Euler gave 0.81; docs/sampling.md).

:meth:`FlowSolver.invert` runs the same steps backwards (data -> noise), each step evaluated at the volume
in hand, so ``sample(invert(x0))`` returns about ``x0`` with an error that shrinks with the step size
(second order for Heun). Its Euler steps call the network at the step's upper time ``t`` (the time at
which the sampler calls it, as DDIM inversion does), so inversion never calls it at ``t = 0`` either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import RFlowScheduler
from torch import Tensor

from idm3d.errors import ArgumentError

__all__ = ["FLOW_SOLVERS", "FlowSolver"]

FLOW_SOLVERS = ("euler", "heun")

Velocity = Callable[[Tensor, Tensor], Tensor]  # v(x, t) with t of shape (B,)


class FlowSolver:
    """A flow run's sampler: MONAI's ``RFlowScheduler``, a solver name and a network-call budget.

    Passed as ``scheduler=`` to :meth:`idm3d.diffusion.pipeline.DiffusionPipeline.sample`/``invert``, like a
    DDIM scheduler with ``set_timesteps`` called. The time grid is made per volume, because MONAI's warp
    (``use_timestep_transform``) depends on the volume's size.

    Args:
        scheduler: the run's ``RFlowScheduler`` (the training one: ``add_noise`` and ``step`` are shared).
        solver: ``euler`` or ``heun``.
        calls: network calls per sample (``>= 1``).
        clip: clip the sampled volume to the data range [-1, 1] (``diffusion.clip_sample``).

    Raises:
        ArgumentError: an unknown solver, a call count below 1 or a grid finer than the training timesteps.
    """

    prediction_type = "flow"

    def __init__(self, scheduler: RFlowScheduler, solver: str = "euler", calls: int = 4, clip: bool = False) -> None:
        if solver not in FLOW_SOLVERS:
            raise ArgumentError("kind", f"expected one of {'|'.join(FLOW_SOLVERS)} for a rflow run, got {solver!r}")
        calls = int(calls)
        steps = calls if solver == "euler" else calls // 2 + 1
        if not 1 <= steps <= scheduler.num_train_timesteps:
            raise ArgumentError("num_inference_steps", f"expected an integer in [1, {scheduler.num_train_timesteps}] "
                                f"(num_train_timesteps) of {solver} steps, got {calls} calls")
        self.scheduler = scheduler
        self.solver = solver
        self.calls = calls
        self.clip = bool(clip)
        self.steps = steps
        self.num_train_timesteps = scheduler.num_train_timesteps

    def grid(self, spatial: Sequence[int]) -> list[float]:
        """The step boundaries from noise to data, ``[t_0 = T, ..., t_S = 0]``, for a volume of grid ``spatial``."""
        numel = int(math.prod(int(s) for s in spatial))
        self.scheduler.set_timesteps(self.steps, input_img_size_numel=numel)
        ts = [float(t) for t in self.scheduler.timesteps.tolist()]
        return [*ts, 0.0]

    def _heun_step(self, i: int) -> bool:
        """Whether step ``i`` takes the corrector: not the last step, nor the first of an even call budget."""
        if self.solver != "heun" or i == self.steps - 1:
            return False
        return not (self.calls % 2 == 0 and i == 0)

    def _step(self, v: Tensor, t: float, x: Tensor, t_next: float) -> Tensor:
        # MONAI's Euler step (it reads int(t_next); the grid's boundaries are integers with discrete timesteps)
        return self.scheduler.step(v, t, x, t_next)[0]  # type: ignore[arg-type]

    def sample(
        self, velocity: Velocity, x: Tensor, *, start: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Integrate from ``x`` at the grid's first time (or the largest boundary ``<= start``) to the data.

        Args:
            velocity: the network, ``v(x, t)``.
            x: pure noise, or (``start``) a clean volume noised to ``start`` with ``add_noise``.
            start: SDEdit: begin at this time instead of ``T``.
            progress: called with the number of network calls made so far.
        """
        ts = self.grid(x.shape[2:])
        first = 0 if start is None else next((i for i, t in enumerate(ts) if t <= start), len(ts) - 1)
        calls = 0
        for i in range(first, len(ts) - 1):
            t, t_next = ts[i], ts[i + 1]
            v = velocity(x, _times(t, x))
            calls += 1
            if self._heun_step(i):
                v2 = velocity(self._step(v, t, x, t_next), _times(t_next, x))
                calls += 1
                v = 0.5 * (v + v2)
            x = self._step(v, t, x, t_next)
            if progress is not None:
                progress(calls)
        return x

    def invert(self, velocity: Velocity, x0: Tensor, progress: Callable[[int], None] | None = None) -> Tensor:
        """The noise from which :meth:`sample` returns about ``x0``: the same steps, data -> noise."""
        ts = self.grid(x0.shape[2:])
        x, calls = x0, 0
        for i in reversed(range(len(ts) - 1)):
            t, t_next = ts[i], ts[i + 1]  # t > t_next: this step goes from t_next up to t
            dt = (t - t_next) / self.num_train_timesteps
            if self._heun_step(i):  # Heun on the reverse ODE: predictor at t_next (> 0 here), corrector at t
                v = velocity(x, _times(t_next, x))
                v = 0.5 * (v + velocity(x - v * dt, _times(t, x)))
                calls += 2
            else:
                v = velocity(x, _times(t, x))
                calls += 1
            x = x - v * dt
            if progress is not None:
                progress(calls)
        return x


def _times(t: float, like: Tensor) -> Tensor:
    """One timestep per batch element: integers as int64 (as in training), a warped grid as float32."""
    if float(t).is_integer():
        return torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)
    return torch.full((like.shape[0],), float(t), dtype=torch.float32, device=like.device)
