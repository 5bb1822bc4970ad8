"""The SSIM loss (``diffusion.ssim_weight``) and test-time averaging of chains (``sample.average``)."""

from __future__ import annotations

import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs
from monai.networks.schedulers import DDPMScheduler

from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.diffusion.schedule import diffusion_loss, predict_x0, training_target
from idm3d.diffusion.structural import ssim_loss, ssim_map_separable
from idm3d.errors import ConfigError
from idm3d.metrics import ssim, ssim_map
from idm3d.runs.config import config_from_dict


@pytest.mark.parametrize("shape", [(2, 1, 20, 18, 16), (1, 2, 13, 24, 7)])
def test_separable_map_equals_monai_values_and_gradients(shape):
    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(shape, generator=gen) * 2 - 1
    pred = (truth + 0.4 * torch.randn(shape, generator=gen)).requires_grad_()
    ours = ssim_map_separable(pred, truth)
    theirs, win = ssim_map(pred.detach(), truth)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=2e-5)
    # the loss is 1 - the metric's mean SSIM, and its gradient is MONAI's full-kernel gradient
    assert ssim_loss(pred, truth).item() == pytest.approx(1 - ssim(pred.detach(), truth), abs=2e-5)
    ssim_loss(pred, truth).backward()
    ref = pred.detach().clone().requires_grad_()
    value, _ = compute_ssim_and_cs(ref, truth, 3, list(win), [1.5] * 3, data_range=2.0)
    (1 - value.mean()).backward()
    assert torch.allclose(pred.grad, ref.grad, atol=1e-6, rtol=1e-3)


def test_identical_volumes_have_zero_loss_and_bad_shapes_fail():
    x = torch.rand(1, 1, 12, 12, 12)
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="equal"):
        ssim_loss(x, x[..., :10])
    with pytest.raises(ValueError, match="too small"):
        ssim_loss(x[..., :2], x[..., :2])


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_pipeline_adds_the_weighted_ssim_of_the_clean_estimate(prediction_type):
    gen = torch.Generator().manual_seed(1)
    sched = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction_type)
    conv = torch.nn.Conv3d(2, 1, 3, padding=1)

    def net(x, t):
        return conv(x)

    batch = {"target": torch.rand(2, 1, 12, 12, 12, generator=gen) * 2 - 1,
             "noise": torch.randn(2, 1, 12, 12, 12, generator=gen),
             "timesteps": torch.tensor([3, 40]), "source": torch.rand(2, 1, 12, 12, 12, generator=gen)}
    plain = DiffusionPipeline(net, sched, loss="l1")
    weighted = DiffusionPipeline(net, sched, loss="l1", ssim_weight=0.7)
    out = plain.forward(batch)
    x_t = sched.add_noise(batch["target"], batch["noise"], batch["timesteps"])
    x0 = predict_x0(sched, x_t, out, batch["timesteps"])
    base = diffusion_loss(out, training_target(sched, batch["target"], batch["noise"], batch["timesteps"]), "l1")
    assert plain.loss(batch).item() == pytest.approx(base.item(), rel=1e-6)
    expected = base + 0.7 * ssim_loss(x0, batch["target"])
    assert weighted.loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="ssim_weight"):
        DiffusionPipeline(net, sched, ssim_weight=-1.0)


def test_config_keys_are_checked():
    assert config_from_dict({"diffusion": {"ssim_weight": 0.5}}).diffusion.ssim_weight == 0.5
    assert config_from_dict({"sample": {"average": 4}}).sample.average == 4
    with pytest.raises(ConfigError, match=r"diffusion\.ssim_weight"):
        config_from_dict({"diffusion": {"ssim_weight": -0.1}})
    with pytest.raises(ConfigError, match=r"sample\.average"):
        config_from_dict({"sample": {"average": 0}})
