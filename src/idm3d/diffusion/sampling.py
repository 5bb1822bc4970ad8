"""DDPM/DDIM sampling loops: unconditional generation and conditional translation.

Translation follows the "concat" conditioning of MONAI's ``DiffusionInferer``: the source modalities are
concatenated to the noisy target as extra input channels at *every* step. Unlike
``DiffusionInferer.sample`` this loop takes a ``torch.Generator`` (reproducible samples without touching
the global RNG), passes one timestep per batch element, can start part-way down the chain (SDEdit-style
reconstruction of a noised volume) and can run the network patch-wise with MONAI's sliding window, so a
volume larger than the training patch fits in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.schedulers import DDIMScheduler, Scheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["denoise_fn", "sample"]


def denoise_fn(
    model: nn.Module,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Return ``f(x, t) -> model output``; patch-wise (Gaussian-blended sliding window) when ``roi_size``.

    Args:
        model: called as ``model(x, timesteps)`` with ``timesteps`` of shape ``(B,)``.
        roi_size: window size (D, H, W); ``None`` runs the whole volume at once.
        overlap: fraction of window overlap for the sliding window.
        sw_batch_size: windows evaluated together.
    """
    if roi_size is None:
        return lambda x, t: model(x, t)
    inferer = SlidingWindowInferer(
        roi_size=tuple(int(r) for r in roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian"
    )

    def run(x: Tensor, t: Tensor) -> Tensor:
        if t.numel() != 1 and len(set(t.tolist())) != 1:
            raise ValueError("patch-wise sampling needs one timestep for the whole batch")
        t0 = t.reshape(-1)[:1]
        # Windows of one volume are batched together: the timestep tensor must follow the window batch.
        return inferer(x, lambda patch: model(patch, t0.expand(patch.shape[0])))

    return run


@torch.no_grad()
def sample(
    model: nn.Module | Callable[[Tensor, Tensor], Tensor],
    scheduler: Scheduler,
    shape: Sequence[int],
    condition: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    x_start: Tensor | None = None,
    start_timestep: int | None = None,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Run the reverse diffusion chain set on ``scheduler`` (``set_timesteps`` already called).

    Args:
        model: the denoiser, or a ``f(x, t)`` from :func:`denoise_fn`.
        scheduler: MONAI ``DDPMScheduler`` or ``DDIMScheduler`` with the training prediction type.
        shape: ``(B, C_target, D, H, W)`` of the generated volume.
        condition: ``(B, C_source, D, H, W)`` source modalities for translation, concatenated to the noisy
            target on the channel axis at each step; ``None`` for unconditional generation.
        generator: RNG for the initial noise and the stochastic steps (DDPM, DDIM with ``eta > 0``).
        x_start: a clean volume to noise to ``start_timestep`` and denoise back (SDEdit reconstruction);
            requires ``start_timestep``.
        start_timestep: skip the chain's timesteps above this one.
        eta: DDIM stochasticity (0 = deterministic DDIM); ignored by DDPM.
        device: where to run; defaults to the model's parameters' device.
        progress: show a tqdm bar.

    Returns:
        The generated ``(B, C_target, D, H, W)`` volume (float32, on ``device``).
    """
    if device is None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    f = model if not isinstance(model, nn.Module) else denoise_fn(model)
    shape = tuple(int(s) for s in shape)
    if condition is not None and (condition.shape[0] != shape[0] or condition.shape[2:] != shape[2:]):
        raise ValueError(f"condition shape {tuple(condition.shape)} does not match sample shape {shape}")
    timesteps = scheduler.timesteps
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if x_start is not None:
        if start_timestep is None:
            raise ValueError("x_start needs start_timestep")
        timesteps = timesteps[timesteps <= start_timestep]
        if timesteps.numel() == 0:
            raise ValueError(f"no sampling timestep <= start_timestep {start_timestep}")
        t0 = timesteps[:1].expand(shape[0]).to(device)
        image = scheduler.add_noise(x_start.to(device, torch.float32), noise, t0)
    else:
        image = noise
    cond = None if condition is None else condition.to(device, torch.float32)
    is_ddim = isinstance(scheduler, DDIMScheduler)
    for t in tqdm(timesteps.tolist(), desc="sampling", disable=not progress, leave=False):
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        model_in = image if cond is None else torch.cat([image, cond], dim=1)
        out = f(model_in, t_batch).float()
        image = _step(scheduler, out, t, image, generator, eta if is_ddim else None)
    return image


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
