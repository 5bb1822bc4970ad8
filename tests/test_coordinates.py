"""Coordinate channels: known values at known voxels, channel counts, and patches that see the whole
volume's coordinates (the crop of the whole grid's channels)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from idm3d.data.patches import PatchSampler, crop
from idm3d.diffusion.coordinates import coordinate_channels, position_of
from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.runs.config import load_config
from idm3d.runs.model_factory import model_channels


def _value(i: int, n: int) -> float:
    return -1.0 + 2.0 * i / (n - 1)


def test_whole_grid_runs_from_minus_one_to_one_on_every_axis():
    c = coordinate_channels((5, 7, 9))
    assert c.shape == (1, 3, 5, 7, 9)
    for axis, n in enumerate((5, 7, 9)):
        first = c[0, axis].select(axis, 0)
        last = c[0, axis].select(axis, n - 1)
        assert torch.all(first == -1.0)
        assert torch.all(last == 1.0)
        centre = c[0, axis].select(axis, n // 2)
        assert torch.allclose(centre, torch.tensor(_value(n // 2, n)))
    # each channel varies along its own axis only
    assert torch.all(c[0, 0] == c[0, 0, :, :1, :1])
    assert float(c.min()) == -1.0
    assert float(c.max()) == 1.0


def test_patch_coordinates_are_its_voxels_places_in_the_whole_volume():
    position = torch.stack([position_of((2, 0, 5), (10, 4, 20)), position_of((0, 1, 0), (3, 6, 8))])
    c = coordinate_channels((3, 3, 3), position)
    assert c.shape == (2, 3, 3, 3, 3)
    assert c[0, :, 0, 0, 0].tolist() == pytest.approx([_value(2, 10), _value(0, 4), _value(5, 20)])
    assert c[0, :, 2, 1, 2].tolist() == pytest.approx([_value(4, 10), _value(1, 4), _value(7, 20)])
    assert c[1, :, 1, 2, 0].tolist() == pytest.approx([_value(1, 3), _value(3, 6), _value(0, 8)])


def test_a_one_voxel_axis_has_coordinate_zero_and_bad_positions_name_the_argument():
    c = coordinate_channels((4, 1, 2))
    assert torch.all(c[:, 1] == 0.0)
    with pytest.raises(ValueError, match=r"^position: a \(3, 3, 3\) grid"):
        coordinate_channels((3, 3, 3), position_of((8, 0, 0), (10, 10, 10)))
    with pytest.raises(ValueError, match=r"^position: expected shape"):
        coordinate_channels((3, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))


def _pipeline(coordinates: bool) -> DiffusionPipeline:
    return DiffusionPipeline(lambda x, t: x[:, :1], DDPMScheduler(num_train_timesteps=10), coordinates=coordinates)


def test_model_input_appends_three_coordinate_channels_after_the_condition():
    x, cond = torch.randn(2, 1, 6, 5, 4), torch.randn(2, 2, 6, 5, 4)
    plain = _pipeline(False).model_input(x, cond)
    assert plain.shape[1] == 3
    with_coords = _pipeline(True).model_input(x, cond)
    assert with_coords.shape[1] == 6
    assert torch.equal(with_coords[:, :3], plain)
    assert torch.equal(with_coords[:, 3:], coordinate_channels((6, 5, 4), batch=2))
    assert _pipeline(True).model_input(x).shape[1] == 4


def test_training_patches_see_the_crop_of_the_whole_volume_coordinates():
    volume = torch.randn(2, 12, 10, 14)
    sampler = PatchSampler([volume], None, (4, 6, 8), batch_size=3, seed=5, target_channels=[1])
    pipe = _pipeline(True)
    whole = coordinate_channels(volume.shape[1:])[0]
    for step in range(4):
        b = sampler.batch(step)
        inputs = pipe.model_input(b["target"], b["source"], b["position"])
        for i in range(3):
            assert torch.equal(inputs[i, 2:], crop(whole, b["corner"][i].tolist(), (4, 6, 8)))
            assert b["position"][i, 1].tolist() == [12, 10, 14]


def test_network_input_channels_follow_the_setting():
    base = ["data.task=translate", "data.sources=[t1]", "data.targets=[t2]"]
    assert model_channels(load_config(None, base).data) == (2, 1)
    assert model_channels(load_config(None, [*base, "data.patch.coordinates=true"]).data) == (5, 1)
    assert model_channels(load_config(None, ["data.patch.coordinates=true"]).data) == (4, 1)


def test_the_demo_held_out_band_knows_its_place_in_the_template():
    from idm3d.runs.data_source import data_source

    cfg = load_config("configs/demo.yaml", ["data.patch.coordinates=true"])
    source = data_source(cfg)
    case = next(source.heldout())
    demo = source.demo
    band = demo.test_slices
    assert case.position.tolist() == [[0, 0, band.start], list(demo.record.image.shape[1:])]
    c = coordinate_channels(case.image.shape[1:], case.position)
    assert float(c[0, 2, 0, 0, 0]) == pytest.approx(_value(band.start, demo.record.image.shape[3]))
    assert float(c[0, 2, 0, 0, -1]) == pytest.approx(_value(band.stop - 1, demo.record.image.shape[3]))
