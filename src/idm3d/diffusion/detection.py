"""Features that tell a real volume from a generated one by running a trained denoiser on it.

Three families, each a use of the diffusion chain (so they live here, next to
:class:`~idm3d.diffusion.pipeline.DiffusionPipeline`):

* **reconstruction error** (DIRE, Wang et al. ICCV 2023): deterministic DDIM inversion to ``x_T``
  (:meth:`DiffusionPipeline.invert`), then the deterministic chain back (``sample(..., eta=0, noise=x_T)``);
  a volume the model could have generated comes back closer to itself;
* **recovered-noise statistics**: for a volume of the model's distribution ``x_T`` should look like
  N(0, I): its mean, spread, skewness, excess kurtosis, lag-1 spatial autocorrelation and the share of its
  energy in radial frequency bands, each against the white-noise value;
* **one-step residual at a small timestep** (Back-in-Time diffusion, 2024): noise the volume lightly with
  a fixed seed and compare the network's clean estimate and noise estimate with the truth.

Every feature is a plain float; the same input gives the same features bit for bit (the only noise is drawn
from a seeded generator). Errors are measured inside ``mask`` (the brain) when one is given.
"""

from __future__ import annotations

import math

import torch
from monai.networks.schedulers import DDIMScheduler
from torch import Tensor

from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.diffusion.schedule import predict_epsilon, predict_x0
from idm3d.errors import ArgumentError

__all__ = ["FEATURE_NAMES", "N_BANDS", "detection_features", "noise_statistics"]

N_BANDS = 4  # radial frequency bands of the recovered noise's power spectrum
FEATURE_NAMES: tuple[str, ...] = (
    "dire_l1",
    "dire_l2",
    "noise_mean",
    "noise_log_std",
    "noise_skew",
    "noise_kurtosis",
    "noise_autocorr",
    *(f"noise_band{k}_log_ratio" for k in range(N_BANDS)),
    "onestep_x0_l1",
    "onestep_eps_mse",
)


def _masked_mean(values: Tensor, mask: Tensor | None) -> float:
    if mask is None:
        return float(values.mean())
    weight = mask.to(values.dtype).expand_as(values)
    return float((values * weight).sum() / weight.sum().clamp_min(1.0))


def noise_statistics(noise: Tensor, n_bands: int = N_BANDS) -> dict[str, float]:
    """How far a ``(B, C, D, H, W)`` recovered noise is from white N(0, 1) noise, as plain floats.

    ``noise_autocorr`` is the mean lag-1 correlation along the three spatial axes (0 for white noise);
    ``noise_band<k>_log_ratio`` is the log of band ``k``'s share of the spectral energy over its share of the
    frequency grid (0 for white noise; low ``k`` = coarse structure left in the noise).

    Raises:
        ValueError: ``noise`` is not 5D, or a spatial size below 2.
    """
    if noise.ndim != 5 or min(noise.shape[2:]) < 2:
        raise ArgumentError("noise", f"expected (B, C, D, H, W) with sizes >= 2, got {tuple(noise.shape)}")
    x = noise.double()
    mean, std = x.mean(), x.std()
    z = (x - mean) / std.clamp_min(1e-12)
    centred = x - x.mean(dim=(2, 3, 4), keepdim=True)
    var = (centred**2).mean()
    lags = [(centred.narrow(d, 1, centred.shape[d] - 1) * centred.narrow(d, 0, centred.shape[d] - 1)).mean() / var
            for d in (2, 3, 4)]
    power = torch.fft.fftn(centred, dim=(2, 3, 4)).abs() ** 2
    freqs = torch.meshgrid(*[torch.fft.fftfreq(s, dtype=torch.float64) for s in x.shape[2:]], indexing="ij")
    radius = torch.sqrt(sum(f**2 for f in freqs)) / math.sqrt(3 * 0.25)  # 0 (DC) .. 1 (corner)
    band = torch.clamp((radius * n_bands).long(), max=n_bands - 1)
    total, cells = power.sum(), band.numel()
    stats = {
        "noise_mean": float(mean),
        "noise_log_std": float(std.log()),
        "noise_skew": float((z**3).mean()),
        "noise_kurtosis": float((z**4).mean() - 3.0),
        "noise_autocorr": float(sum(lags) / 3),
    }
    for k in range(n_bands):
        inside = band == k
        share_energy = power[..., inside].sum() / total
        share_cells = inside.sum() / cells
        stats[f"noise_band{k}_log_ratio"] = float(torch.log(share_energy.clamp_min(1e-30) / share_cells))
    return stats


@torch.no_grad()
def detection_features(
    pipeline: DiffusionPipeline,
    x0: Tensor,
    condition: Tensor | None = None,
    *,
    scheduler: DDIMScheduler,
    mask: Tensor | None = None,
    residual_timestep: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """The features of one volume ``x0`` (1, C, D, H, W) in the model's intensity range, by :data:`FEATURE_NAMES`.

    Args:
        pipeline: the trained model's pipeline.
        x0: the volume to judge (batch of one).
        condition: the source modalities (translation runs), else ``None``.
        scheduler: a ``DDIMScheduler`` with ``set_timesteps`` called: the inversion and reconstruction chain.
        mask: ``(1, 1, D, H, W)`` bool region where errors are averaged (default: everywhere).
        residual_timestep: the small timestep of the one-step residual (default: 5 % of the training chain).
        seed: seed of the one-step residual's noise.
        device: where the network runs (default: the model's device).

    Raises:
        ValueError: a batch other than one, a mask of another grid, a timestep outside the chain.
    """
    if x0.ndim != 5 or x0.shape[0] != 1:
        raise ArgumentError("x0", f"expected one volume (1, C, D, H, W), got {tuple(x0.shape)}")
    if mask is not None and tuple(mask.shape[2:]) != tuple(x0.shape[2:]):
        raise ArgumentError("mask", f"grid {tuple(mask.shape[2:])} is not the volume's {tuple(x0.shape[2:])}")
    n_train = pipeline.scheduler.num_train_timesteps
    t_small = max(1, round(0.05 * n_train)) if residual_timestep is None else int(residual_timestep)
    if not 0 <= t_small < n_train:
        raise ArgumentError("residual_timestep", f"expected 0 <= t < {n_train}, got {t_small}")
    x0 = x0.float().cpu()
    mask = None if mask is None else mask.bool().cpu()
    dev = pipeline._device(device)

    x_T = pipeline.invert(x0, condition, scheduler=scheduler, device=device).cpu()
    back = pipeline.sample(tuple(x0.shape), condition, scheduler=scheduler, noise=x_T, eta=0.0, device=device).cpu()
    features = {"dire_l1": _masked_mean((back - x0).abs(), mask), "dire_l2": _masked_mean((back - x0) ** 2, mask)}
    features.update(noise_statistics(x_T))

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    t = torch.tensor([t_small], dtype=torch.long)
    sched = pipeline.scheduler
    x_t = sched.add_noise(x0, eps, t)
    cond = None if condition is None else condition.to(dev, torch.float32)
    out = pipeline.denoiser()(pipeline.model_input(x_t.to(dev), cond), t.to(dev)).cpu()
    features["onestep_x0_l1"] = _masked_mean((predict_x0(sched, x_t, out, t) - x0).abs(), mask)
    features["onestep_eps_mse"] = _masked_mean((predict_epsilon(sched, x_t, out, t) - eps) ** 2, mask)
    return {name: features[name] for name in FEATURE_NAMES}

