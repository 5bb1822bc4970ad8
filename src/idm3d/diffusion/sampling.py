"""The denoiser as a function of ``(x, t)``, whole-volume or patch-wise, and a one-call sampling shortcut.

Patch-wise inference uses MONAI's Gaussian-blended sliding window, so a volume larger than the training
patch fits in memory. The chain itself lives in :class:`idm3d.diffusion.pipeline.DiffusionPipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monai.inferers import SlidingWindowInferer
from monai.networks.schedulers import Scheduler
from torch import Tensor, nn

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


def sample(
    model: nn.Module | Callable[[Tensor, Tensor], Tensor],
    scheduler: Scheduler,
    shape: Sequence[int],
    condition: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Run the reverse chain set on ``scheduler``: ``DiffusionPipeline(model, scheduler).sample(...)``.

    ``model`` is the denoiser or a ``f(x, t)`` from :func:`denoise_fn`; the keyword arguments are those of
    :meth:`idm3d.diffusion.pipeline.DiffusionPipeline.sample`.
    """
    from idm3d.diffusion.pipeline import DiffusionPipeline

    return DiffusionPipeline(model, scheduler).sample(shape, condition, **kwargs)
