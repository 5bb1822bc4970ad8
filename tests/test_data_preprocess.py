"""MONAI preprocessing: RAS, brain-box crop, padding, [-1, 1] scaling, and its inverse."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import BRATS_AFFINE, phantom
from idm3d.data.dataset import VolumeDataset
from idm3d.data.nifti import load_volume
from idm3d.data.preprocess import IntensityScaling, PreprocessConfig, preprocess_case
from idm3d.errors import DataError

SHAPE = (20, 24, 16)


def _case(seed: int = 1) -> dict[str, np.ndarray]:
    return {"t1": phantom(SHAPE, "t1", seed), "t2": phantom(SHAPE, "t2", seed)}


def _world(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


@pytest.mark.parametrize("divisible_by", [8, 16])
def test_record_grid_values_and_mask(divisible_by: int) -> None:
    rec = preprocess_case(_case(), BRATS_AFFINE, PreprocessConfig(divisible_by=divisible_by), case_id="c")
    assert rec.image.shape[0] == 2
    assert rec.mask.shape == (1, *rec.image.shape[1:])
    assert all(s % divisible_by == 0 for s in rec.image.shape[1:])
    assert rec.image.dtype == torch.float32
    assert rec.mask.dtype == torch.bool
    assert rec.image.min() == -1.0
    assert rec.image.max() == 1.0
    # Outside the brain mask the images sit at the background value -1.
    assert torch.all(rec.image[:, ~rec.mask[0]] == -1.0)
    # RAS: positive diagonal affine although BraTS stores x and y flipped.
    assert np.all(np.diag(rec.affine)[:3] > 0)
    assert int(rec.mask.sum()) == int((_case()["t1"] > 0).sum())


def test_affine_keeps_world_positions() -> None:
    volumes = _case()
    marker = (5, 7, 9)
    volumes["t1"][marker] = 1000.0  # a unique brightest voxel inside the brain
    rec = preprocess_case(volumes, BRATS_AFFINE, PreprocessConfig(percentiles=(0.0, 100.0)))
    found = np.unravel_index(int(torch.argmax(rec.channel("t1"))), rec.image.shape[1:])
    np.testing.assert_allclose(_world(rec.affine, found), _world(BRATS_AFFINE, marker))


def test_intensity_scaling_inverse() -> None:
    scaling = IntensityScaling(lo=10.0, hi=110.0)
    x = torch.linspace(-50, 200, 101)
    y = scaling.forward(x)
    assert y.min() == -1
    assert y.max() == 1
    np.testing.assert_allclose(scaling.inverse(y), x.clamp(10, 110), atol=1e-4)
    assert IntensityScaling.from_dict(scaling.to_dict()) == scaling


def test_to_original_inverts_crop_pad_orientation_and_scaling(tmp_path: Path) -> None:
    volumes = _case()
    rec = preprocess_case(volumes, BRATS_AFFINE, PreprocessConfig(margin=1))
    back = rec.to_original(rec.channel("t2"), "t2")
    assert back.shape == SHAPE
    s = rec.scalings["t2"]
    inside = (volumes["t2"] > s.lo) & (volumes["t2"] < s.hi)
    assert inside.sum() > 100
    np.testing.assert_allclose(back[inside], volumes["t2"][inside], atol=1e-3)
    rec.save(tmp_path / "pred.nii.gz", rec.channel("t2"), "t2")
    data, affine = load_volume(tmp_path / "pred.nii.gz")
    np.testing.assert_allclose(affine, BRATS_AFFINE)
    np.testing.assert_allclose(data, back, atol=1e-5)
    rec.save(tmp_path / "pred_grid.nii.gz", rec.channel("t2"), "t2", original_grid=False)
    _, grid_affine = load_volume(tmp_path / "pred_grid.nii.gz")
    np.testing.assert_allclose(grid_affine, rec.affine)


def test_pickled_record_still_inverts() -> None:
    rec = preprocess_case(_case(), BRATS_AFFINE, PreprocessConfig(spacing=1.5))
    copy = pickle.loads(pickle.dumps(rec))  # e.g. returned by a DataLoader worker
    np.testing.assert_array_equal(copy.to_original(copy.image[:1], "t1"), rec.to_original(rec.image[:1], "t1"))


def test_spacing_and_fixed_size() -> None:
    rec = preprocess_case(_case(), BRATS_AFFINE, PreprocessConfig(spacing=2.0, divisible_by=8))
    np.testing.assert_allclose(np.abs(np.diag(rec.affine)[:3]), 2.0)
    assert all(s % 8 == 0 for s in rec.image.shape[1:])
    assert max(rec.image.shape[1:]) <= 16
    assert rec.to_original(rec.channel("t1")).shape == SHAPE
    fixed = preprocess_case(_case(), BRATS_AFFINE, PreprocessConfig(spatial_size=(32, 16, 16)))
    assert fixed.image.shape == (2, 32, 16, 16)


def test_mask_from_and_threshold() -> None:
    volumes = _case()
    volumes["t2"][0, 0, 0] = 5.0  # a stray background voxel in t2 only
    only_t1 = preprocess_case(volumes, BRATS_AFFINE, PreprocessConfig(mask_from=("t1",), crop_foreground=False))
    both = preprocess_case(volumes, BRATS_AFFINE, PreprocessConfig(crop_foreground=False))
    assert int(both.mask.sum()) == int(only_t1.mask.sum()) + 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"percentiles": (50.0, 10.0)}, ValueError),
        ({"divisible_by": 0}, ValueError),
        ({"spacing": -1.0}, ValueError),
        ({"spatial_size": (16, 16)}, ValueError),
    ],
)
def test_config_validation(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        PreprocessConfig(**kwargs)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="label maps"):
        preprocess_case({"t1": phantom(SHAPE, "t1"), "seg": phantom(SHAPE, "seg")}, BRATS_AFFINE)
    with pytest.raises(DataError, match="brain mask is empty"):
        preprocess_case(_case(), BRATS_AFFINE, PreprocessConfig(foreground_threshold=1e6), case_id="c9")
    with pytest.raises(ValueError, match="mask_from"):
        preprocess_case(_case(), BRATS_AFFINE, PreprocessConfig(mask_from=("flair",)))


def test_volume_dataset_over_brats(brats_dir: Path) -> None:
    ds = VolumeDataset(brats_dir, ("t1", "t2"), case_ids=["BraTS20_Training_003", "BraTS20_Training_001"])
    assert len(ds) == 2
    assert ds.case_ids == ["BraTS20_Training_003", "BraTS20_Training_001"]
    rec = ds[0]
    assert rec.case_id == "BraTS20_Training_003"
    assert rec.modalities == ("t1", "t2")
    assert ds[0] is rec  # cached
    with pytest.raises(DataError, match="BraTS20_Training_999"):
        VolumeDataset(brats_dir, ("t1", "t2"), case_ids=["BraTS20_Training_999"])
