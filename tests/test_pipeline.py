"""DiffusionPipeline: concat conditioning, the training loss, and DDIM inversion against an exact denoiser."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from helpers import perturb
from idm3d.diffusion import DiffusionPipeline, build_scheduler, training_target
from idm3d.runs.config import DiffusionConfig, ModelConfig
from idm3d.runs.model_factory import build_model

SCALE = 0.5  # data ~ N(0, SCALE^2): the exact denoiser is linear in x_t


class GaussianOracle(nn.Module):
    """The exact (MMSE) denoiser of data x0 ~ N(0, s^2 I), in the scheduler's prediction type.

    With x_t = sqrt(a) x0 + sqrt(1 - a) eps: E[x0 | x_t] = sqrt(a) s^2 x_t / (a s^2 + 1 - a) and
    E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a). Its probability-flow ODE is exact, so DDIM
    inversion followed by DDIM sampling must return the input up to discretisation error.
    """

    def __init__(self, scheduler, prediction_type: str) -> None:
        super().__init__()
        self.register_buffer("alphas", scheduler.alphas_cumprod.clone().float())
        self.prediction_type = prediction_type

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        x_t = x[:, :1]  # any condition channels are ignored
        a = self.alphas[t.long()].reshape(-1, 1, 1, 1, 1)
        denom = a * SCALE**2 + 1 - a
        x0, eps = a.sqrt() * SCALE**2 * x_t / denom, (1 - a).sqrt() * x_t / denom
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def _ddim(prediction_type: str, steps: int, timesteps: int = 1000):
    cfg = DiffusionConfig(num_train_timesteps=timesteps, prediction_type=prediction_type, clip_sample=False)
    return build_scheduler(cfg, "ddim", steps)


def _round_trip_error(prediction_type: str, steps: int) -> tuple[float, Tensor, Tensor]:
    sched = _ddim(prediction_type, steps)
    pipe = DiffusionPipeline(GaussianOracle(sched, prediction_type), sched)
    x0 = SCALE * torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    x_t = pipe.invert(x0, scheduler=sched)
    return float((_sample_from(pipe, sched, x_t) - x0).abs().mean()), x0, x_t


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_invert_then_ddim_sample_reconstructs_the_input(prediction_type):
    err, x0, x_t = _round_trip_error(prediction_type, 100)
    # ~2% of the data's mean magnitude (0.4) at 100 steps (measured 0.0107) ...
    assert err < 0.02, err
    # ... and the error is the one-step approximation's: it halves when the steps halve.
    assert _round_trip_error(prediction_type, 200)[0] < 0.6 * err
    assert 0.9 < float(x_t.std()) < 1.1  # x_T has the noise's scale, not the data's
    sched = _ddim(prediction_type, 100)
    pipe = DiffusionPipeline(GaussianOracle(sched, prediction_type), sched)
    other = _sample_from(pipe, sched, torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)))
    assert float((other - x0).abs().mean()) > 10 * err  # another start lands elsewhere


def _sample_from(pipe: DiffusionPipeline, sched, x_t: Tensor) -> Tensor:
    """Deterministic DDIM from a given x_T (the chain of ``sample`` with its initial noise replaced)."""
    image = x_t.clone()
    for t in sched.timesteps.tolist():
        out = pipe.denoiser()(pipe.model_input(image), torch.full((image.shape[0],), t))
        image, _ = sched.step(out, t, image, eta=0.0)
    return image


def test_sample_with_eta_zero_is_the_same_chain_as_the_reference_loop():
    sched = _ddim("epsilon", 20)
    pipe = DiffusionPipeline(GaussianOracle(sched, "epsilon"), sched)
    noise_gen = torch.Generator().manual_seed(3)
    ours = pipe.sample((1, 1, 4, 4, 4), scheduler=sched, generator=torch.Generator().manual_seed(3))
    ref = _sample_from(pipe, sched, torch.randn((1, 1, 4, 4, 4), generator=noise_gen))
    assert torch.allclose(ours, ref, atol=1e-6)


def test_invert_is_deterministic_with_a_real_network_and_a_condition():
    torch.manual_seed(0)
    model = build_model(ModelConfig("idm", {"channels": 8, "levels": 2, "attention_levels": [False, True]}), 2, 1)
    perturb(model, 0, 0.05).eval()
    sched = _ddim("sample", 5, timesteps=50)
    pipe = DiffusionPipeline(model, sched)
    x0, cond = torch.rand(2, 1, 8, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8, 8)
    a, b = pipe.invert(x0, cond, scheduler=sched), pipe.invert(x0, cond, scheduler=sched)
    assert torch.equal(a, b)
    assert a.shape == x0.shape
    assert bool(torch.isfinite(a).all())
    assert not torch.allclose(pipe.invert(x0, cond * 0, scheduler=sched), a)  # the condition is used


def test_invert_refuses_a_ddpm_scheduler_and_another_prediction_type():
    sched = _ddim("epsilon", 5)
    pipe = DiffusionPipeline(GaussianOracle(sched, "epsilon"), sched)
    ddpm = build_scheduler(DiffusionConfig(num_train_timesteps=1000), "ddpm", 5)
    with pytest.raises(TypeError, match="DDIMScheduler"):
        pipe.invert(torch.zeros(1, 1, 4, 4, 4), scheduler=ddpm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="predicts 'sample'"):
        pipe.invert(torch.zeros(1, 1, 4, 4, 4), scheduler=_ddim("sample", 5))


def test_model_input_concatenates_the_condition_once_and_loss_matches_the_target():
    sched = build_scheduler(DiffusionConfig(num_train_timesteps=20, prediction_type="v_prediction"), "ddpm")
    seen: list[Tensor] = []

    def net(x: Tensor, t: Tensor) -> Tensor:
        seen.append(x)
        return x[:, :1] * 0

    pipe = DiffusionPipeline(net, sched, loss="l1")
    gen = torch.Generator().manual_seed(0)
    batch = {"target": torch.rand(2, 1, 4, 4, 4, generator=gen), "source": torch.rand(2, 2, 4, 4, 4, generator=gen),
             "noise": torch.randn(2, 1, 4, 4, 4, generator=gen), "timesteps": torch.tensor([3, 17])}
    loss = pipe.loss(batch)
    x_t = sched.add_noise(batch["target"], batch["noise"], batch["timesteps"])
    assert torch.equal(seen[0], torch.cat([x_t, batch["source"]], dim=1))
    target = training_target(sched, batch["target"], batch["noise"], batch["timesteps"])
    assert float(loss) == pytest.approx(float(target.abs().mean()), rel=1e-6)
    with pytest.raises(ValueError, match="condition shape"):
        pipe.model_input(x_t, batch["source"][:1])
    with pytest.raises(ValueError, match="loss"):
        DiffusionPipeline(net, sched, loss="huber")
