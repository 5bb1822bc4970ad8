"""The sampling chain in place: the same volume as the chain that concatenated and stepped whole.

"Before" is ``DiffusionPipeline.sample``'s loop before the in-place chain: a fresh ``model_input``
(concatenation) and a whole-volume MONAI ``scheduler.step`` per step. The in-place chain keeps one
input buffer with x_t as its first channels and writes each step there (in depth slabs for a
deterministic step): the same operations on the same values, so the volumes are bitwise equal.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import Tensor, nn

from helpers import perturb
from idm3d import IDMUNet
from idm3d.diffusion import DiffusionPipeline, build_scheduler
from idm3d.diffusion import pipeline as pipeline_module
from idm3d.runs.config import DiffusionConfig


class Denoiser(nn.Module):
    """A small IDMUNet taking the target, a condition channel and the coordinate channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = perturb(IDMUNet(in_channels=in_channels, channels=8, levels=2, blocks_per_level=1,
                                   attention_levels=(False, True)), 0, 0.05)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t)


def before(pipe: DiffusionPipeline, shape, condition, scheduler, generator, eta, noise, position) -> Tensor:
    """The chain as it ran before: concatenate the input, step the whole volume, every step."""
    image = noise.clone()
    f = pipe.denoiser()
    eta_arg = eta if "DDIM" in type(scheduler).__name__ else None
    with torch.no_grad():
        for t in scheduler.timesteps.tolist():
            t_batch = torch.full((shape[0],), t, dtype=torch.long)
            out = f(pipe.model_input(image, condition, position), t_batch)
            image = pipeline_module._step(scheduler, out, t, image, generator, eta_arg)
    return image


@pytest.mark.parametrize(
    ("kind", "eta", "conditioned", "coordinates"),
    [("ddim", 0.0, True, True), ("ddim", 0.0, False, False), ("ddim", 0.5, True, False), ("ddpm", 0.0, False, True)],
)
def test_in_place_chain_is_bitwise_the_old_one(
    kind: str, eta: float, conditioned: bool, coordinates: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "STEP_SLAB_BYTES", 3 * 2 * 16 * 16 * 4 + 7)  # 3 planes, odd split of 16
    cfg = DiffusionConfig(clip_sample=True)
    in_channels = 1 + conditioned + 3 * coordinates
    model = Denoiser(in_channels)
    shape = (2, 1, 16, 16, 16)
    condition = torch.randn(shape) if conditioned else None
    noise = torch.randn(shape)
    noise0 = noise.clone()
    results = []
    for run in (before, None):
        scheduler = build_scheduler(cfg, kind, 4)
        pipe = DiffusionPipeline(model, build_scheduler(cfg, "ddpm"), coordinates=coordinates)
        generator = torch.Generator().manual_seed(3)
        if run is None:
            results.append(pipe.sample(shape, condition, scheduler=scheduler, generator=generator, eta=eta,
                                       noise=noise))
        else:
            results.append(run(pipe, shape, condition, scheduler, generator, eta, noise, None))
    assert torch.equal(results[0], results[1])
    assert torch.equal(noise, noise0)  # the caller's noise is not the chain's buffer
    assert results[1].shape == shape
    assert results[1].is_contiguous()


def test_deterministic_step_runs_in_slabs_without_a_whole_volume_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "STEP_SLAB_BYTES", 4 * 16 * 16 * 4)
    scheduler = build_scheduler(DiffusionConfig(), "ddim", 2)
    seen = []
    real = scheduler.step

    def spy(self, out, t, sample, **kwargs):
        seen.append(sample.shape[2])
        return real(out, t, sample, **kwargs)

    scheduler.step = types.MethodType(spy, scheduler)
    x_t, out = torch.randn(1, 1, 10, 16, 16), torch.randn(1, 1, 10, 16, 16)
    expected, _ = real(out, int(scheduler.timesteps[0]), x_t.clone(), eta=0.0)
    pipeline_module._step_into(scheduler, out, int(scheduler.timesteps[0]), x_t, None, 0.0)
    assert seen == [4, 4, 2]
    assert torch.equal(x_t, expected)
