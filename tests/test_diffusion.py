"""Diffusion glue: MONAI schedulers from config, prediction-type targets, sampling loops."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from helpers import torch_threads
from idm3d.diffusion import build_scheduler, denoise_fn, diffusion_loss, predict_x0, sample, training_target
from idm3d.runs.config import DiffusionConfig, ModelConfig
from idm3d.runs.model_factory import build_model

TINY_MODELS = {
    "idm": ModelConfig("idm", {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, True]}),
    "monai": ModelConfig("monai", {"channels": [8, 8], "num_res_blocks": 1, "attention_levels": [False, False],
                                   "norm_num_groups": 4, "num_head_channels": 4}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize(
    ("schedule", "monai_name"),
    [("linear", "linear_beta"), ("linear_beta", "linear_beta"), ("scaled_linear", "scaled_linear_beta"),
     ("cosine", "cosine"), ("sigmoid_beta", "sigmoid_beta")],
)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_build_scheduler_names(schedule, monai_name, kind):
    cfg = DiffusionConfig(num_train_timesteps=50, schedule=schedule, prediction_type="v_prediction")
    sched = build_scheduler(cfg, kind, num_inference_steps=10)
    assert isinstance(sched, DDPMScheduler if kind == "ddpm" else DDIMScheduler)
    assert sched.prediction_type == "v_prediction"
    assert sched.num_train_timesteps == 50
    assert len(sched.timesteps) == 10
    reference = DDPMScheduler(num_train_timesteps=50, schedule=monai_name)
    assert torch.allclose(sched.alphas_cumprod, reference.alphas_cumprod)
    assert bool((sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all())


def test_build_scheduler_rejects_bad_values():
    cfg = DiffusionConfig(num_train_timesteps=20)
    # The diffusion layer names its own arguments; the training layer names the config key.
    with pytest.raises(ValueError, match=r"num_inference_steps"):
        build_scheduler(cfg, "ddim", num_inference_steps=21)
    with pytest.raises(ValueError, match=r"ddpm\|ddim"):
        build_scheduler(cfg, "euler")  # type: ignore[arg-type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_target_is_inverted_by_predict_x0_and_monai_step(prediction_type):
    """A perfect network output (the training target) recovers x0 exactly, in our helper and in MONAI."""
    cfg = DiffusionConfig(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=False)
    sched = build_scheduler(cfg, "ddpm")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 37, 99])
    x_t = sched.add_noise(x0, noise, t)
    target = training_target(sched, x0, noise, t, prediction_type)
    assert torch.allclose(predict_x0(sched, x_t, target, t, prediction_type), x0, atol=1e-4)
    for i in range(3):
        _, x0_monai = sched.step(target[i : i + 1], int(t[i]), x_t[i : i + 1])
        assert torch.allclose(x0_monai, x0[i : i + 1], atol=1e-4)


def test_diffusion_loss_kinds():
    a, b = torch.zeros(2, 1, 2, 2, 2), torch.full((2, 1, 2, 2, 2), 2.0)
    assert float(diffusion_loss(a, b, "mse")) == pytest.approx(4.0)
    assert float(diffusion_loss(a, b, "l1")) == pytest.approx(2.0)
    assert diffusion_loss(a.bfloat16(), b, "mse").dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(a, b[:1])


@pytest.mark.parametrize("name", ["idm", "monai"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_monai_inferer_trains_and_samples_factory_models(name, kind, prediction_type):
    """3 optimisation steps + 2 sampling steps through MONAI's DiffusionInferer, conditional (concat)."""
    torch.manual_seed(0)
    model = build_model(TINY_MODELS[name], in_channels=2, out_channels=1)
    cfg = DiffusionConfig(num_train_timesteps=20, prediction_type=prediction_type)
    sched = build_scheduler(cfg, kind)
    inferer = DiffusionInferer(sched)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    cond = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        noise = torch.randn_like(x0)
        t = torch.randint(0, 20, (2,))
        pred = inferer(x0, model, noise, t, condition=cond, mode="concat")
        loss = diffusion_loss(pred, training_target(sched, x0, noise, t, prediction_type))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    sched.set_timesteps(2)
    model.eval()
    out = inferer.sample(torch.randn(1, 1, 16, 16, 16), model, sched, conditioning=cond[:1], mode="concat",
                         verbose=False)
    assert out.shape == (1, 1, 16, 16, 16)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["idm", "monai"])
def test_our_ddim_loop_matches_monai_inferer_sample(name):
    torch.manual_seed(1)
    model = build_model(TINY_MODELS[name], in_channels=2, out_channels=1).eval()
    sched = build_scheduler(DiffusionConfig(num_train_timesteps=30), "ddim", num_inference_steps=3)
    cond = torch.rand(1, 1, 16, 16, 16)
    noise = torch.randn((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(7))
    ours = sample(model, sched, (1, 1, 16, 16, 16), cond, generator=torch.Generator().manual_seed(7))
    theirs = DiffusionInferer(sched).sample(noise, model, sched, conditioning=cond, mode="concat", verbose=False)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_sampling_is_reproducible_by_seed_and_patchwise_matches_whole_volume():
    torch.manual_seed(2)
    model = build_model(TINY_MODELS["monai"], in_channels=1, out_channels=1).eval()
    sched = build_scheduler(DiffusionConfig(num_train_timesteps=30), "ddpm", num_inference_steps=2)
    shape = (1, 1, 16, 16, 16)

    def draw(seed: int, roi=None) -> torch.Tensor:
        return sample(denoise_fn(model, roi), sched, shape, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # One window covering the whole volume is the whole-volume pass.
    assert torch.allclose(draw(0, roi=(16, 16, 16)), a, atol=1e-5)
    # Overlapping windows still give a finite volume of the right shape.
    assert draw(0, roi=(8, 8, 16)).shape == shape


def test_sdedit_start_runs_only_lower_timesteps():
    calls: list[int] = []

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    sched = build_scheduler(DiffusionConfig(num_train_timesteps=100, prediction_type="epsilon"), "ddim", 10)
    x0 = torch.rand(1, 1, 4, 4, 4) * 2 - 1
    out = sample(f, sched, x0.shape, x_start=x0, start_timestep=50, generator=torch.Generator().manual_seed(0))
    assert calls
    assert max(calls) <= 50
    assert calls == sorted(calls, reverse=True)
    assert len(calls) < 10
    assert out.shape == x0.shape
    with pytest.raises(ValueError, match="start_timestep"):
        sample(f, sched, x0.shape, x_start=x0)


def test_condition_shape_must_match():
    sched = build_scheduler(DiffusionConfig(num_train_timesteps=10), "ddim", 2)
    with pytest.raises(ValueError, match="condition shape"):
        sample(lambda x, t: x[:, :1], sched, (1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 8))
