"""The flow-run branch of :class:`~idm3d.diffusion.pipeline.DiffusionPipeline`'s ``sample`` and ``invert``.

Kept apart from the DDPM/DDIM chain so that the pipeline's sampling loop (and its memory work) stays one
code path per objective: here the network is wrapped as a velocity ``v(x, t)`` (concat conditioning,
coordinates, autocast, sliding window: the pipeline's own :meth:`model_input` and :meth:`denoiser`) and
handed to :class:`~idm3d.diffusion.solvers.FlowSolver`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from idm3d.diffusion.flow import flow_velocity
from idm3d.diffusion.solvers import FlowSolver
from idm3d.errors import ArgumentError

__all__ = ["FlowChainMixin"]


class FlowChainMixin:
    """``_sample_flow`` / ``_invert_flow`` for a pipeline (needs ``model_input``, ``denoiser``, ``_device``)."""

    def _velocity(
        self, solver: FlowSolver, condition: Tensor | None, position: Tensor | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        f = self.denoiser()  # type: ignore[attr-defined]

        def v(x: Tensor, t: Tensor) -> Tensor:
            out = f(self.model_input(x, condition, position), t)  # type: ignore[attr-defined]
            return flow_velocity(solver.scheduler, x, out, t)  # an x0-parametrised run's output, as a velocity

        return v

    def _sample_flow(
        self, solver: FlowSolver, shape: tuple[int, ...], condition: Tensor | None, generator: torch.Generator | None,
        x_start: Tensor | None, start_timestep: int | None, device: torch.device, progress: bool,
        noise: Tensor | None, position: Tensor | None,
    ) -> Tensor:
        if not isinstance(solver, FlowSolver):
            raise ArgumentError("scheduler", f"a flow run samples with a FlowSolver (euler|heun), got "
                                f"{type(solver).__name__}")
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ArgumentError("noise", f"shape {tuple(noise.shape)} is not the sample shape {shape}")
        image = noise.to(device, torch.float32)
        start = None
        if x_start is not None:
            if start_timestep is None:
                raise ValueError("x_start needs start_timestep")
            start = float(start_timestep)
            t0 = torch.full((shape[0],), int(start_timestep), dtype=torch.long, device=device)
            image = solver.scheduler.add_noise(x_start.to(device, torch.float32), image, t0)
        cond = None if condition is None else condition.to(device, torch.float32)
        self.model_input(image, cond, position)  # type: ignore[attr-defined]  # shape checks before the first call
        with tqdm(total=solver.calls, desc="sampling", disable=not progress, leave=False) as bar:
            out = solver.sample(self._velocity(solver, cond, position), image, start=start,
                                progress=lambda n: bar.update(n - bar.n))
        # The data lie in [-1, 1]; with diffusion.clip_sample (as the DDPM schedulers clip x0) the output is too.
        return out.clamp(-1.0, 1.0) if solver.clip else out

    def _invert_flow(
        self, solver: FlowSolver, x0: Tensor, condition: Tensor | None, device: torch.device | str | None,
        progress: bool, position: Tensor | None,
    ) -> Tensor:
        if not isinstance(solver, FlowSolver):
            raise ArgumentError("scheduler", f"a flow run inverts with a FlowSolver (euler|heun), got "
                                f"{type(solver).__name__}")
        dev = self._device(device)  # type: ignore[attr-defined]
        image = x0.to(dev, torch.float32)
        cond = None if condition is None else condition.to(dev, torch.float32)
        self.model_input(image, cond, position)  # type: ignore[attr-defined]
        with tqdm(total=solver.calls, desc="inverting", disable=not progress, leave=False) as bar:
            return solver.invert(self._velocity(solver, cond, position), image,
                                 progress=lambda n: bar.update(n - bar.n))
