"""Patch sampling: aligned channels, masks, regions, and reproducibility from (seed, step)."""

from __future__ import annotations

import pytest
import torch

from idm3d.data.patches import PatchSampler, crop, foreground_box, generator_for_step, sample_corner, sample_patch


def _volume(shape=(24, 20, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    source = torch.rand((1, *shape), generator=g)
    volume = torch.cat([source, 2 * source + 1])  # target = known function of source
    mask = torch.zeros((1, *shape), dtype=torch.bool)
    mask[:, 4:10, 6:12, 8:14] = True
    return volume, mask


@pytest.mark.parametrize("foreground_prob", [0.0, 0.5, 1.0])
def test_same_seed_same_patch_and_channels_aligned(foreground_prob: float) -> None:
    volume, mask = _volume()
    a = sample_patch(volume, mask, (8, 8, 8), generator_for_step(7, 3), foreground_prob=foreground_prob)
    b = sample_patch(volume, mask, (8, 8, 8), generator_for_step(7, 3), foreground_prob=foreground_prob)
    assert a[2] == b[2]
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    patch = a[0]
    assert patch.shape == (2, 8, 8, 8)
    torch.testing.assert_close(patch[1], 2 * patch[0] + 1)
    torch.testing.assert_close(a[1], crop(mask, a[2], (8, 8, 8)))


def test_different_steps_differ() -> None:
    corners = {sample_corner((64, 64, 64), (8, 8, 8), generator_for_step(0, s)) for s in range(20)}
    assert len(corners) > 15


def test_foreground_patches_contain_the_mask() -> None:
    volume, mask = _volume()
    for step in range(30):
        _patch, mpatch, corner = sample_patch(volume, mask, (6, 6, 6), generator_for_step(1, step), foreground_prob=1.0)
        assert mpatch[0, 3, 3, 3], f"patch centre at corner {corner} is outside the mask"


def test_foreground_centres_are_uniform_over_mask_voxels() -> None:
    mask = torch.zeros((16, 16, 16), dtype=torch.bool)
    mask[2:4, 2:4, 2:4] = True  # 8 voxels
    mask[10, 2:12, 3] = True  # a thin line of 10 voxels: the box is mostly empty
    counts: dict[tuple[int, ...], int] = {}
    for step in range(1800):
        corner = sample_corner((16, 16, 16), (1, 1, 1), generator_for_step(9, step), mask=mask, foreground_prob=1.0)
        counts[corner] = counts.get(corner, 0) + 1
    assert set(counts) == {tuple(v) for v in torch.nonzero(mask).tolist()}
    assert min(counts.values()) > 50
    assert max(counts.values()) < 150


def test_sparse_mask_falls_back_to_exact_draw() -> None:
    mask = torch.zeros((24, 20, 28), dtype=torch.bool)
    mask[0, 0, 0] = mask[23, 19, 27] = True  # the box is the whole volume, 2 voxels in 13 440
    corners = {
        sample_corner((24, 20, 28), (1, 1, 1), generator_for_step(4, s), mask=mask, foreground_prob=1.0)
        for s in range(40)
    }
    assert corners == {(0, 0, 0), (23, 19, 27)}


def test_foreground_box() -> None:
    _, mask = _volume()
    assert foreground_box(mask) == ((4, 10), (6, 12), (8, 14))
    assert foreground_box(mask, (None, None, (12, 28))) == ((4, 10), (6, 12), (12, 14))
    assert foreground_box(mask, (None, None, (20, 28))) is None


def test_uniform_corners_cover_the_volume_and_respect_region() -> None:
    region = (None, (2, 18), (10, 20))
    corners = torch.tensor(
        [sample_corner((24, 20, 28), (4, 4, 4), generator_for_step(2, s), region=region) for s in range(400)]
    )
    assert corners[:, 0].min() == 0
    assert corners[:, 0].max() == 20
    assert corners[:, 1].min() >= 2
    assert corners[:, 1].max() <= 14
    assert corners[:, 2].min() >= 10
    assert corners[:, 2].max() <= 16


def test_foreground_respects_region() -> None:
    _, mask = _volume()
    # The mask spans z 8..13; the region z 12..28 keeps only its top; patches must start at z >= 12.
    for step in range(50):
        corner = sample_corner(
            (24, 20, 28),
            (4, 4, 4),
            generator_for_step(3, step),
            mask=mask,
            foreground_prob=1.0,
            region=(None, None, (12, 28)),
        )
        assert corner[2] >= 12


@pytest.mark.parametrize(("patch", "region"), [((30, 4, 4), None), ((4, 4, 12), (None, None, (0, 10)))])
def test_patch_too_large_is_config_error(patch, region) -> None:
    with pytest.raises(ValueError, match="patch_size"):
        sample_corner((24, 20, 28), patch, torch.Generator(), region=region)


def test_sampler_resumes_identically_from_state_dict() -> None:
    volume, mask = _volume()
    second = volume.flip(-1).contiguous()
    kwargs = {"patch_size": (8, 8, 8), "batch_size": 3, "seed": 11, "foreground_prob": 0.5, "target_channels": [1]}
    run = PatchSampler([volume, second], [mask, None], **kwargs)
    full = [next(run) for _ in range(6)]
    interrupted = PatchSampler([volume, second], [mask, None], **kwargs)
    for _ in range(3):
        next(interrupted)
    resumed = PatchSampler([volume, second], [mask, None], **kwargs)
    resumed.load_state_dict(interrupted.state_dict())
    for expected in full[3:]:
        got = next(resumed)
        for key in ("source", "target", "mask", "case", "corner"):
            assert torch.equal(got[key], expected[key]), key
    assert full[0]["source"].shape == (3, 1, 8, 8, 8)
    torch.testing.assert_close(full[0]["target"], 2 * full[0]["source"] + 1)
    assert set(torch.cat([b["case"] for b in full]).tolist()) == {0, 1}


def test_sampler_validation() -> None:
    volume, mask = _volume()
    with pytest.raises(ValueError, match="foreground_prob"):
        PatchSampler([volume], [mask], (4, 4, 4), foreground_prob=1.5)
    with pytest.raises(ValueError, match="patch_size"):
        PatchSampler([volume], [mask], (4, 4, 4), regions=[(None, None, (0, 2))])
    sampler = PatchSampler([volume], [mask], (4, 4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        sampler.load_state_dict({**sampler.state_dict(), "batch_size": 5})
