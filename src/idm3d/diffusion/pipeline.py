"""``DiffusionPipeline``: a denoiser, its noise schedule and its conditioning, for training and inference.

The one place that knows how a network is called in a diffusion model (diffusers' pipeline, MONAI's
``DiffusionInferer`` with ``mode="concat"``):

* :meth:`~DiffusionPipeline.model_input` puts the source modalities (translation) after the noisy
  target on the channel axis, then (``coordinates=True``) three channels of whole-volume voxel
  coordinates (:mod:`idm3d.diffusion.coordinates`) - the only concat conditioning in idm3d;
* :meth:`~DiffusionPipeline.loss` is the training loss of one batch (noise, timesteps and the target of
  the scheduler's prediction type);
* :meth:`~DiffusionPipeline.sample` runs a DDPM/DDIM reverse chain from noise, or part-way from a noised
  volume (SDEdit), whole-volume or patch-wise with MONAI's sliding window;
* :meth:`~DiffusionPipeline.invert` runs deterministic DDIM backwards, clean volume -> its noise ``x_T``
  (the inverse of ``sample(..., eta=0)`` up to the usual one-step approximation).

Unlike ``DiffusionInferer.sample`` the chain takes a ``torch.Generator`` (reproducible without touching
the global RNG) and passes one timestep per batch element. The pipeline knows no config file: the
training layer builds it from a run (``idm3d.runs.load``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, Scheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from idm3d.diffusion.coordinates import coordinate_channels
from idm3d.diffusion.flow import is_flow, prediction_kind
from idm3d.diffusion.flow_chain import FlowChainMixin
from idm3d.diffusion.sampling import denoise_fn
from idm3d.diffusion.schedule import diffusion_loss, predict_epsilon, predict_x0, training_target
from idm3d.diffusion.solvers import FlowSolver
from idm3d.diffusion.structural import ssim_loss
from idm3d.errors import ArgumentError

__all__ = ["Denoiser", "DiffusionPipeline"]

Denoiser = Callable[[Tensor, Tensor], Tensor]


class DiffusionPipeline(FlowChainMixin):
    """A denoiser with its MONAI scheduler, conditioning and loss.

    Args:
        model: called as ``model(x, timesteps)`` with ``x`` the noisy target followed by the condition
            channels (and the coordinate channels); an ``nn.Module`` or a function ``f(x, t)``.
        scheduler: the training scheduler (MONAI ``DDPMScheduler``/``DDIMScheduler``); its
            ``prediction_type`` is the pipeline's.
        loss: ``mse`` or ``l1`` between the network output and the training target.
        ssim_weight: adds ``ssim_weight * (1 - SSIM)`` between the clean-volume estimate and the clean
            target (:func:`~idm3d.diffusion.structural.ssim_loss`); 0 = off.
        roi_size: sampling only: run the network patch-wise on windows of this size (D, H, W).
        overlap: sliding-window overlap for ``roi_size``.
        autocast: a context manager factory wrapped around every network call (mixed precision).
        coordinates: append each voxel's whole-volume coordinates in [-1, 1] as three input channels
            (patch training with position; the network then has 3 more input channels).

    Raises:
        ValueError: an unknown loss (MONAI's schedulers refuse an unknown prediction type).
    """

    def __init__(
        self,
        model: nn.Module | Denoiser,
        scheduler: Scheduler,
        *,
        loss: str = "mse",
        ssim_weight: float = 0.0,
        roi_size: Sequence[int] | None = None,
        overlap: float = 0.25,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        coordinates: bool = False,
    ) -> None:
        if loss not in ("mse", "l1"):
            raise ArgumentError("loss", f"expected mse|l1, got {loss!r}")
        if not ssim_weight >= 0:
            raise ArgumentError("ssim_weight", f"expected >= 0, got {ssim_weight!r}")
        self.ssim_weight = float(ssim_weight)
        self.model = model
        self.scheduler = scheduler
        self.loss_kind = loss
        self.roi_size = None if roi_size is None else tuple(int(r) for r in roi_size)
        self.overlap = float(overlap)
        self.autocast = autocast or contextlib.nullcontext
        self.coordinates = bool(coordinates)

    @property
    def prediction_type(self) -> str:
        """What the network predicts: ``epsilon``, ``sample`` (x0), ``v_prediction`` or ``flow`` (rectified flow)."""
        return prediction_kind(self.scheduler)

    # ------------------------------------------------------------------------------- one network call

    def model_input(self, x_t: Tensor, condition: Tensor | None = None, position: Tensor | None = None) -> Tensor:
        """The network's input: the noisy target, the condition's channels, then (``coordinates``) the
        whole-volume coordinates of the grid at ``position`` (``(B, 2, 3)`` corner and volume shape; ``None``:
        the grid is the whole volume). Concat conditioning, here only."""
        parts = [x_t]
        if condition is not None:
            if condition.shape[0] != x_t.shape[0] or condition.shape[2:] != x_t.shape[2:]:
                raise ValueError(f"condition shape {tuple(condition.shape)} does not match sample shape "
                                 f"{tuple(x_t.shape)}")
            parts.append(condition.to(x_t.device, x_t.dtype))
        if self.coordinates:
            parts.append(coordinate_channels(x_t.shape[2:], position, batch=x_t.shape[0], device=x_t.device,
                                             dtype=x_t.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def noisy_input(self, batch: Mapping[str, Tensor | None]) -> Tensor:
        """``model_input`` of a training batch (``target``, ``noise``, ``timesteps``, ``source``, ``position``)."""
        x_t = self.scheduler.add_noise(batch["target"], batch["noise"], batch["timesteps"])
        return self.model_input(x_t, batch.get("source"), batch.get("position"))

    def forward(self, batch: Mapping[str, Tensor | None], model: nn.Module | Denoiser | None = None) -> Tensor:
        """The network output for a training batch (``model`` replaces the pipeline's, e.g. a DDP wrapper)."""
        net = self.model if model is None else model
        with self.autocast():
            return net(self.noisy_input(batch), batch["timesteps"])

    def loss(self, batch: Mapping[str, Tensor | None], model: nn.Module | Denoiser | None = None) -> Tensor:
        """The training loss of ``batch``: the output against the prediction type's target, in float32."""
        target = training_target(self.scheduler, batch["target"], batch["noise"], batch["timesteps"])
        x_t = self.scheduler.add_noise(batch["target"], batch["noise"], batch["timesteps"])
        net = self.model if model is None else model
        with self.autocast():
            output = net(self.model_input(x_t, batch.get("source"), batch.get("position")), batch["timesteps"])
        loss = diffusion_loss(output, target, self.loss_kind)
        if self.ssim_weight:  # the noisy input once, for the network and the clean estimate
            x0 = predict_x0(self.scheduler, x_t, output.float(), batch["timesteps"])
            loss = loss + self.ssim_weight * ssim_loss(x0, batch["target"])
        return loss

    def denoiser(self) -> Denoiser:
        """``f(x, t)``: the network under autocast, patch-wise when ``roi_size`` is set."""
        model = self.model
        f = denoise_fn(model, self.roi_size, self.overlap) if isinstance(model, nn.Module) else model

        def run(x: Tensor, t: Tensor) -> Tensor:
            with self.autocast():
                return f(x, t).float()

        return run

    # ------------------------------------------------------------------------------- chains

    def _device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        params = list(self.model.parameters()) if isinstance(self.model, nn.Module) else []
        return params[0].device if params else torch.device("cpu")

    def _check(self, scheduler: Scheduler) -> None:
        # prediction_kind, not the scheduler's string: MONAI's RFlowScheduler also says "v_prediction"
        if prediction_kind(scheduler) != self.prediction_type:
            raise ArgumentError("scheduler", f"predicts {prediction_kind(scheduler)!r}, the pipeline's model "
                             f"{self.prediction_type!r}")

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        condition: Tensor | None = None,
        *,
        scheduler: Scheduler | FlowSolver | None = None,
        generator: torch.Generator | None = None,
        x_start: Tensor | None = None,
        start_timestep: int | None = None,
        eta: float = 0.0,
        device: torch.device | str | None = None,
        progress: bool = False,
        noise: Tensor | None = None,
        position: Tensor | None = None,
    ) -> Tensor:
        """Run the reverse chain set on ``scheduler`` (``set_timesteps`` already called).

        Args:
            shape: ``(B, C_target, D, H, W)`` of the generated volume.
            condition: ``(B, C_source, D, H, W)`` source modalities (translation) or ``None``.
            scheduler: the sampling scheduler (DDPM or DDIM, same prediction type), or for a flow run a
                :class:`~idm3d.diffusion.solvers.FlowSolver` (Euler/Heun, a network-call budget).
            generator: RNG for the initial noise and the stochastic steps (DDPM, DDIM with ``eta > 0``).
            x_start: a clean volume to noise to ``start_timestep`` and denoise back (SDEdit).
            start_timestep: skip the chain's timesteps above this one (with ``x_start``).
            eta: DDIM stochasticity (0 = deterministic); ignored by DDPM.
            device: where to run (default: the model's parameters' device).
            progress: show a tqdm bar.
            noise: the initial noise instead of a draw from ``generator`` (e.g. the ``x_T`` of :meth:`invert`).
            position: with ``coordinates``, where the grid lies in its whole volume (``(B, 2, 3)`` or ``(2, 3)``
                corner and volume shape); ``None``: the sampled grid is the whole volume.

        Returns:
            The ``(B, C_target, D, H, W)`` volume (float32, on ``device``).
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        self._check(scheduler)
        device = self._device(device)
        shape = tuple(int(s) for s in shape)
        if is_flow(scheduler):
            return self._sample_flow(scheduler, shape, condition, generator, x_start, start_timestep, device,
                                     progress, noise, position)
        timesteps = scheduler.timesteps
        given = noise is not None
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ArgumentError("noise", f"shape {tuple(noise.shape)} is not the sample shape {shape}")
        noise = noise.to(device, torch.float32)
        if x_start is not None:
            if start_timestep is None:
                raise ValueError("x_start needs start_timestep")
            timesteps = timesteps[timesteps <= start_timestep]
            if timesteps.numel() == 0:
                raise ValueError(f"no sampling timestep <= start_timestep {start_timestep}")
            image = scheduler.add_noise(x_start.to(device, torch.float32), noise,
                                        timesteps[:1].expand(shape[0]).to(device))
        else:
            image = noise.clone() if given else noise  # the chain writes into it: never the caller's tensor
        del noise
        cond = None if condition is None else condition.to(device, torch.float32)
        # The chain's state: the network input, built once (condition and coordinate channels do not
        # change), with x_t as its first channels; each step writes x_{t-1} there. The loop then holds
        # that buffer, the prediction and a step's slab temporaries beside the network's own peak.
        buffer = self.model_input(image, cond, position)  # shape checks before the first network call
        x_t = buffer[:, : shape[1]]
        del image, cond
        f = self.denoiser()
        eta_arg = eta if isinstance(scheduler, DDIMScheduler) else None
        for t in tqdm(timesteps.tolist(), desc="sampling", disable=not progress, leave=False):
            t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
            out = f(buffer, t_batch)
            _step_into(scheduler, out, t, x_t, generator, eta_arg)
            del out
        return x_t if x_t.shape == buffer.shape else x_t.clone()  # not a view keeping the condition alive

    @torch.no_grad()
    def invert(
        self,
        x0: Tensor,
        condition: Tensor | None = None,
        *,
        scheduler: DDIMScheduler | FlowSolver,
        device: torch.device | str | None = None,
        progress: bool = False,
        position: Tensor | None = None,
    ) -> Tensor:
        """Deterministic DDIM inversion: the ``x_T`` from which ``sample(..., eta=0)`` returns about ``x0``.

        For a flow run (``scheduler`` a :class:`~idm3d.diffusion.solvers.FlowSolver`) the flow's ODE is
        integrated from ``x0`` to the noise with the same solver and grid as sampling
        (:mod:`idm3d.diffusion.flow_chain`).

        Each DDIM step ``x_t -> x_prev`` of ``scheduler``'s chain is undone in reverse order: the network is
        evaluated at the volume in hand with the step's timestep ``t`` (the standard approximation
        ``eps(x_prev, t) ~ eps(x_t, t)``, exact as the steps shrink), its noise estimate is read as MONAI's
        DDIM step reads it, and ``x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps``. The clean-volume estimate is
        not clipped (clipping has no inverse). No randomness is involved: the same input gives the same
        output, bit for bit.

        Args:
            x0: ``(B, C_target, D, H, W)`` clean volume(s), in the training intensity range.
            condition: the source modalities the model was trained with (translation), else ``None``.
            scheduler: a ``DDIMScheduler`` with ``set_timesteps`` called and the pipeline's prediction type.
            device: where to run (default: the model's device).
            progress: show a tqdm bar.
            position: the grid's place in its whole volume (coordinate channels), as in :meth:`sample`.

        Returns:
            The recovered noise ``x_T`` (float32, same shape as ``x0``, on ``device``).
        """
        if is_flow(scheduler):
            return self._invert_flow(scheduler, x0, condition, device, progress, position)
        if not isinstance(scheduler, DDIMScheduler):
            raise TypeError(f"scheduler: DDIM inversion needs a DDIMScheduler, got {type(scheduler).__name__}")
        self._check(scheduler)
        device = self._device(device)
        image = x0.to(device, torch.float32)
        cond = None if condition is None else condition.to(device, torch.float32)
        self.model_input(image, cond, position)
        f = self.denoiser()
        alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        stride = scheduler.num_train_timesteps // scheduler.num_inference_steps
        for t in tqdm(scheduler.timesteps.flip(0).tolist(), desc="inverting", disable=not progress, leave=False):
            prev = t - stride  # the level MONAI's step at t lands on
            a_t = alphas[t]
            a_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod.to(device)
            t_batch = torch.full((image.shape[0],), t, dtype=torch.long, device=device)
            eps = predict_epsilon(scheduler, image, f(self.model_input(image, cond, position), t_batch), t_batch)
            x0_hat = (image - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            image = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps
        return image


# Bytes of one slab of a deterministic step's update (MONAI's step makes ~4 temporaries of its input's size).
STEP_SLAB_BYTES = 32 * 2**20


def _step_into(
    scheduler: Scheduler, out: Tensor, t: int, x_t: Tensor, generator: torch.Generator | None, eta: float | None
) -> None:
    """``x_t <- scheduler.step(out, t, x_t)``, in ``x_t``'s memory.

    A deterministic step (DDIM with ``eta == 0``) is elementwise, so it runs on depth slabs: the same
    operations on the same values (bitwise MONAI's result), a slab's temporaries instead of the
    volume's. A stochastic one (DDPM, ``eta > 0``) runs whole, so its noise is drawn as MONAI draws
    it (one call over the whole shape); it runs after the network call returned, below its peak.
    """
    if eta is None or eta > 0:
        x_t.copy_(_step(scheduler, out, t, x_t, generator, eta))
        return
    plane = max(1, x_t[:, :, :1].numel() * x_t.element_size())
    planes = max(1, STEP_SLAB_BYTES // plane)
    for d0 in range(0, x_t.shape[2], planes):
        part = x_t[:, :, d0 : d0 + planes]
        prev, _ = scheduler.step(out[:, :, d0 : d0 + planes], t, part, eta=0.0, generator=generator)
        part.copy_(prev)


def _step(
    scheduler: Scheduler, out: Tensor, t: int, image: Tensor, generator: torch.Generator | None, eta: float | None
) -> Tensor:
    kwargs = {"generator": generator} if eta is None else {"eta": eta, "generator": generator}
    # MONAI draws the step noise on the output's device; a CPU generator cannot serve a CUDA tensor, so
    # such a step runs on CPU (same numbers on every device).
    if generator is not None and generator.device != out.device:
        prev, _ = scheduler.step(out.cpu(), t, image.cpu(), **kwargs)
        return prev.to(out.device)
    prev, _ = scheduler.step(out, t, image, **kwargs)
    return prev
