"""PSNR / SSIM / MAE on synthetic volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric

from idm3d.metrics import evaluate_pair, mae, psnr, ssim, ssim_map


def _smooth(shape=(32, 32, 32), seed: int = 0) -> torch.Tensor:
    """A smooth random volume in [-1, 1] (blurred noise), like a scaled MR image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g)
    for _ in range(3):
        x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    x = (x - x.min()) / (x.max() - x.min())
    return (2 * x - 1)[0, 0]


def _mask(shape=(32, 32, 32)) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[8:24, 6:26, 10:22] = True
    return m


def test_identical_volumes() -> None:
    x = _smooth()
    out = evaluate_pair(x, x.clone(), _mask())
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["ssim_mask"] == pytest.approx(1.0, abs=1e-5)
    assert out["mae"] == 0.0
    assert out["mae_mask"] == 0.0
    assert math.isinf(out["psnr"])
    assert out["psnr"] > 0
    assert math.isinf(out["psnr_mask"])


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("data_range", [2.0, 1.0])
def test_psnr_of_gaussian_noise(sigma: float, data_range: float) -> None:
    target = _smooth()
    noise = sigma * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    pred = target + noise
    expected = 20 * math.log10(data_range) - 10 * math.log10(sigma**2)
    got = psnr(pred, target, data_range=data_range)
    # 32^3 samples estimate sigma^2 to ~0.8%: about 0.03 dB.
    assert got == pytest.approx(expected, abs=0.1)
    exact = 20 * math.log10(data_range) - 10 * math.log10(float((noise**2).mean()))
    assert got == pytest.approx(exact, abs=1e-3)


@pytest.mark.parametrize("offset", [0.0, 0.1, -0.37])
def test_mae_of_constant_offset(offset: float) -> None:
    target = _smooth()
    assert mae(target + offset, target) == pytest.approx(abs(offset), abs=1e-6)
    assert mae(target + offset, target, _mask()) == pytest.approx(abs(offset), abs=1e-6)


def test_masked_psnr_mae_ignore_voxels_outside_mask() -> None:
    target, mask = _smooth(), _mask()
    pred = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    wrecked = pred.clone()
    wrecked[~mask] = torch.rand(int((~mask).sum()), generator=torch.Generator().manual_seed(3)) * 5
    assert psnr(wrecked, target, mask) == pytest.approx(psnr(pred, target, mask), abs=1e-6)
    assert mae(wrecked, target, mask) == pytest.approx(mae(pred, target, mask), abs=1e-7)
    assert psnr(wrecked, target) < psnr(pred, target) - 10
    # ...and they do respond to voxels inside.
    inside = pred.clone()
    inside[mask] += 0.1
    assert mae(inside, target, mask) > mae(pred, target, mask) + 0.05


def test_masked_ssim_depends_only_on_mask_and_its_window() -> None:
    target, mask = _smooth(), _mask()
    pred = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(4))
    # Voxels farther than half a window (5) from the mask cannot enter any in-mask SSIM window.
    far = torch.ones_like(mask)
    far[3:29, 1:31, 5:27] = False
    wrecked = pred.clone()
    wrecked[far] = 3.0
    assert ssim(wrecked, target, mask) == pytest.approx(ssim(pred, target, mask), abs=1e-6)
    assert ssim(wrecked, target) < ssim(pred, target) - 0.01
    blurred_inside = pred.clone()
    blurred_inside[mask] = 0.0
    assert ssim(blurred_inside, target, mask) < ssim(pred, target, mask) - 0.1


def test_ssim_matches_monai_metric_and_orders_noise() -> None:
    target = _smooth()
    values = []
    for sigma in (0.02, 0.1, 0.3):
        pred = target + sigma * torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
        ours = ssim(pred, target)
        monai = SSIMMetric(spatial_dims=3, data_range=2.0)(pred[None, None], target[None, None])
        assert ours == pytest.approx(float(monai.mean()), abs=1e-6)
        values.append(ours)
    assert values[0] > values[1] > values[2]


def test_shapes_and_small_volumes() -> None:
    target = _smooth((12, 9, 16))
    pred = target + 0.1
    batched = evaluate_pair(pred[None, None].numpy(), target[None, None].numpy())
    plain = evaluate_pair(pred, target)
    assert batched == pytest.approx(plain)
    value, win = ssim_map(pred, target)
    assert win == (11, 9, 11)
    assert value.shape[2:] == (2, 1, 6)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"pred": np.zeros((8, 8, 8)), "target": np.zeros((8, 8, 9))}, "same shape"),
        ({"mask": np.zeros((16, 16, 16), bool)}, "empty"),
        ({"mask": np.ones((8, 8, 8), bool)}, "spatial shape"),
        ({"data_range": 0.0}, "data_range"),
        ({"pred": np.zeros((16, 16))}, "expected a 3D"),
    ],
)
def test_bad_inputs(kwargs: dict, fragment: str) -> None:
    args = {"pred": np.ones((16, 16, 16)), "target": np.zeros((16, 16, 16)), "mask": None, "data_range": 2.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        evaluate_pair(args["pred"], args["target"], args["mask"], args["data_range"])


def test_mask_near_border_only_is_reported_for_ssim() -> None:
    mask = np.zeros((16, 16, 16), bool)
    mask[0:2] = True
    with pytest.raises(ValueError, match="border"):
        ssim(np.ones((16, 16, 16)), np.zeros((16, 16, 16)), mask)
