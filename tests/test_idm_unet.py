"""IDMUNet: exact memory-saving gradients, MONAI drop-in behaviour, and a real learning signal."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from helpers import perturb
from idm3d import IDMUNet


def _grads(net: IDMUNet, x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    out = net(x, t)
    return torch.autograd.grad((out * weight).sum(), [x, *net.parameters()])


def _group_rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = torch.stack([(u - v).norm() for u, v in zip(a, b)]).norm()
    return float(diff / torch.stack([v.norm() for v in b]).norm())


CONFIGS = [
    # levels, blocks, attention, attention_levels, bookends, down_fraction
    (2, 1, "none", (False, False), True, 0.25),
    (3, 2, "channel", (False, True, True), True, 0.25),
    (3, 1, "spatial", (False, False, True), False, 0.5),
    (2, 2, "channel", (True, True), False, 0.125),
]


@pytest.mark.parametrize(("levels", "blocks", "attention", "att_levels", "bookends", "down_fraction"), CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_memory_efficient_gradients_equal_plain_autograd(
    levels, blocks, attention, att_levels, bookends, down_fraction, seed
):
    torch.manual_seed(seed)
    net = IDMUNet(
        in_channels=2,
        out_channels=1,
        channels=8,
        levels=levels,
        blocks_per_level=blocks,
        attention=attention,
        attention_levels=att_levels,
        bookends=bookends,
        down_fraction=down_fraction,
    ).double()
    perturb(net, seed, 0.05)
    x = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 1000, (2,))
    weight = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)
    net.memory_efficient = True
    efficient = _grads(net, x, t, weight)
    net.memory_efficient = False
    plain = _grads(net, x, t, weight)
    assert _group_rel_error(efficient[:1], plain[:1]) <= 1e-10
    assert _group_rel_error(efficient[1:], plain[1:]) <= 1e-10
    assert max(net.reconstruction_error(x, t).values()) <= 1e-10


def test_fp32_gradients_match_within_tolerance():
    torch.manual_seed(3)
    net = IDMUNet(channels=8, levels=3, blocks_per_level=2, attention="channel", attention_levels=(False, True, True))
    perturb(net, 3, 0.05)
    x, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([500])
    weight = torch.randn(1, 1, 16, 16, 16)
    efficient = _grads(net, x, t, weight)
    net.memory_efficient = False
    plain = _grads(net, x, t, weight)
    assert _group_rel_error(efficient[1:], plain[1:]) <= 1e-5
    assert _group_rel_error(efficient[:1], plain[:1]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_dtype_and_context(dtype):
    net = IDMUNet(
        in_channels=3, out_channels=2, channels=8, levels=2, attention_levels=(False, True), context_dim=5
    ).to(dtype)
    x = torch.randn(2, 3, 8, 16, 8, dtype=dtype)
    out = net(x, torch.tensor([1, 999]), context=torch.randn(2, 1, 5, dtype=dtype))
    assert out.shape == (2, 2, 8, 16, 8)
    assert out.dtype == dtype
    with pytest.raises(ValueError, match="context"):
        net(x, torch.tensor([1, 2]))


@pytest.mark.parametrize(
    ("kwargs", "shape", "match"),
    [
        ({"levels": 3}, (1, 1, 10, 16, 16), "multiples of 4"),
        ({"levels": 2}, (1, 2, 8, 8, 8), r"\(B, 1, D, H, W\)"),
        ({"levels": 2}, (1, 1, 8, 8), r"\(B, 1, D, H, W\)"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, shape, match):
    net = IDMUNet(channels=8, attention="none", attention_levels=(False,) * kwargs["levels"], **kwargs)
    with pytest.raises(ValueError, match=match):
        net(torch.randn(*shape), torch.tensor([0]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spatial_dims": 2}, "spatial_dims"),
        ({"attention_levels": (True,)}, "attention_levels"),
        ({"attention": "global"}, "attention"),
        ({"channels": 6, "down_fraction": 0.25}, "down_fraction"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IDMUNet(**{"channels": 8, "levels": 2, "attention_levels": (False, False), **kwargs})


def test_drop_in_for_monai_schedulers_and_inferer():
    torch.manual_seed(0)
    net = IDMUNet(channels=8, levels=3, blocks_per_level=1, attention_levels=(False, False, True))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    images = torch.randn(2, 1, 16, 16, 16)
    for _ in range(3):
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (2,))
        prediction = inferer(inputs=images, diffusion_model=net, noise=noise, timesteps=timesteps)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(2)
    with torch.no_grad():
        sample = DiffusionInferer(ddim).sample(
            input_noise=torch.randn(1, 1, 16, 16, 16), diffusion_model=net, scheduler=ddim, verbose=False
        )
    assert sample.shape == (1, 1, 16, 16, 16)
    assert torch.isfinite(sample).all()


def test_overfits_a_single_noisy_volume():
    """A real learning signal: the loss on one fixed noisy volume drops at least 10x."""
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net = IDMUNet(channels=8, levels=3, blocks_per_level=1, attention="channel", attention_levels=(False, False, True))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean = torch.randn(1, 1, 16, 16, 16)
    noise = torch.randn_like(clean)
    t = torch.tensor([400])
    noisy = scheduler.add_noise(clean, noise, t)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(net(noisy, t), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 20:
            break
    assert min(losses[-10:]) < losses[0] / 10, f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
