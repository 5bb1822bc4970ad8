"""``idm3d demo`` end to end with a tiny budget (2 steps, 8-channel nets, 2 sampler calls) on the MNI demo data.

The module's demo runs both directions, as ``make run`` does (the IDMUNets, then the baselines, train in
two spawned processes side by side on a machine with 2+ cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch

from idm3d.cli.main import main
from idm3d.data.demo import demo_licence_text
from idm3d.demo.reference import fit_linear_map
from idm3d.demo.report import METRIC_KEYS
from idm3d.errors import DataError

TINY = [
    "--steps", "2", "--no-progress",
    "--set", "model.kwargs={channels: 8, levels: 3, blocks_per_level: 1, attention_levels: [false, false, false], "
             "attention: none}",
    "--set", "data.patch_size=[32,32,16]",
    "--set", "sample.steps=2",
]


@pytest.fixture(scope="module")
def top_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["demo", "--out", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def demo_out(top_out: Path) -> Path:
    """The T1 -> T2 direction's folder."""
    return top_out / "t1_to_t2"


@pytest.fixture(scope="module")
def report(demo_out: Path) -> dict:
    return json.loads((demo_out / "report.json").read_text())


@pytest.fixture(scope="module")
def headline(top_out: Path) -> dict:
    return json.loads((top_out / "report.json").read_text())


def test_headline_holds_both_directions_as_measured(top_out: Path, headline: dict):
    md = (top_out / "report.md").read_text()
    assert set(headline["directions"]) == {"t1-t2", "t2-t1"}
    for name, (src, tgt) in (("t1-t2", ("t1", "t2")), ("t2-t1", ("t2", "t1"))):
        d = headline["directions"][name]
        assert (d["sources"], d["targets"]) == ([src], [tgt])
        own = json.loads((top_out / d["folder"] / "report.json").read_text())
        assert own["task"] == {"sources": [src], "targets": [tgt]}
        assert d["metrics"] == own["metrics"]  # the headline repeats the direction's measurements
        assert f"{own['metrics']['idm']['ssim_mask']:.4f}" in md
        assert f"{src.upper()} -> {tgt.upper()}" in md
        for label in ("idm", "monai"):
            assert own["training"][label]["cpu_s"] > 0
        # equal budget of the run's kind: the baseline gets the CPU time its IDMUNet used
        assert own["settings"]["monai"]["train"]["max_cpu_seconds"] == pytest.approx(own["training"]["idm"]["cpu_s"])
        assert own["settings"]["monai"]["train"]["max_seconds"] is None
        truth = nib.load(top_out / d["folder"] / "predictions" / f"{tgt}_truth.nii.gz")
        source = nib.load(top_out / d["folder"] / "predictions" / f"{src}_input.nii.gz")
        assert truth.shape == source.shape
    t2_from_t1 = np.asarray(nib.load(top_out / "t1_to_t2" / "predictions" / "t2_truth.nii.gz").dataobj)
    t2_into_t1 = np.asarray(nib.load(top_out / "t2_to_t1" / "predictions" / "t2_input.nii.gz").dataobj)
    assert np.array_equal(t2_from_t1, t2_into_t1)  # the reverse direction's input is the forward one's truth
    assert demo_licence_text().strip() in md


def test_report_has_finite_metrics_for_every_model(demo_out: Path, report: dict):
    md = (demo_out / "report.md").read_text()
    for label in ("idm", "monai", "linear"):
        metrics = report["metrics"][label]
        assert set(metrics) == set(METRIC_KEYS)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
        assert -1.0 <= metrics["ssim_mask"] <= 1.0
        assert f"{metrics['psnr_mask']:.2f}" in md  # the table shows this run's numbers
    # The linear map beats two-step nets by a wide margin on this template: a real, not a trivial, floor.
    assert report["metrics"]["linear"]["ssim_mask"] > report["metrics"]["idm"]["ssim_mask"]
    goal = report["goals"]["psnr_mask_at_least_monai"]
    assert goal["met"] == (report["metrics"]["idm"]["psnr_mask"] >= report["metrics"]["monai"]["psnr_mask"])


def test_report_states_data_slabs_and_licence(demo_out: Path, report: dict):
    md = (demo_out / "report.md").read_text()
    (t0, t1), (h0, h1) = report["data"]["train_slices_z"], report["data"]["heldout_slices_z"]
    assert t1 <= h0  # training slabs lie below the held-out band
    assert f"z in [{t0}, {t1})" in md
    assert f"z in [{h0}, {h1})" in md
    assert f"indices {h0}..{h1 - 1}" in md
    assert "not a patient scan" in md
    assert "MNI ICBM152 2009c" in md
    assert demo_licence_text().strip() in md
    assert report["licence"] == demo_licence_text()
    assert "idm3d demo --out" in md
    assert "--steps 2" in md


def test_memory_and_training_figures_come_from_this_run(report: dict):
    for label in ("idm", "monai"):
        mem, train = report["memory"][label], report["training"][label]
        assert mem["status"] == "ok", mem
        assert mem["parameters"] == train["parameters"] > 0  # the measured net is the trained one
        assert mem["peak_growth_mib"] >= 0.0
        assert mem["step_s"] > 0.0
        assert 1 <= train["steps"] <= 2
    # Equal training time: the baseline's budget is the CPU time the IDMUNet trained.
    assert report["settings"]["monai"]["train"]["max_cpu_seconds"] == pytest.approx(report["training"]["idm"]["cpu_s"])
    assert report["settings"]["monai"]["model"]["name"] == "monai"


def test_training_slab_check_lies_inside_the_training_slabs(demo_out: Path, report: dict):
    (t0, t1) = report["data"]["train_slices_z"]
    (h0, h1) = report["data"]["heldout_slices_z"]
    md = (demo_out / "report.md").read_text()
    for label in ("idm", "monai"):
        slab = report["training_slab"][label]
        a, b = slab["slices_z"]
        assert t0 <= a < b <= t1
        assert b - a == h1 - h0  # same depth as the held-out band
        assert all(math.isfinite(slab[k]) for k in METRIC_KEYS)
        assert f"z in [{a}, {b})" in md


@pytest.mark.parametrize("name", ["preview.png", "loss_curves.png"])
def test_pngs_open_and_show_something(demo_out: Path, name: str):
    image = mpimg.imread(demo_out / name)
    assert image.ndim == 3
    assert image.shape[0] > 200
    assert image.shape[1] > 400
    grey = image[..., :3].mean(axis=-1)
    assert grey.std() > 0.05
    assert len(np.unique(np.round(grey, 2))) > 20


def test_predictions_are_written_on_the_band_grid_and_masked(demo_out: Path, report: dict):
    shape = tuple(report["data"]["heldout_shape"])
    mask = nib.load(demo_out / "predictions" / "brain_mask.nii.gz")
    inside = np.asarray(mask.dataobj) > 0.5
    assert mask.shape == shape
    assert inside.sum() == report["data"]["brain_voxels_heldout"]
    for label in ("idm", "monai", "linear"):
        image = nib.load(demo_out / "predictions" / f"{label}_t2.nii.gz")
        data = np.asarray(image.dataobj)
        assert image.shape == shape
        assert np.isfinite(data).all()
        assert np.allclose(image.affine, mask.affine)
        # sample.mask_output (configs/demo.yaml): background outside the brain mask, for all three alike
        assert (data[~inside] == -1.0).all()
        assert data[inside].std() > 0
    for label in ("idm", "monai"):  # the unmasked network output is scored too
        assert set(report["metrics_unmasked_output"][label]) == set(METRIC_KEYS)
        assert report["metrics_unmasked_output"][label]["psnr_mask"] == pytest.approx(
            report["metrics"][label]["psnr_mask"], abs=1e-4)  # voxels inside the mask are untouched


@pytest.mark.parametrize(
    ("extra", "fault"),
    [
        ([], "--overwrite"),  # the module's demo already lives there
        (["--overwrite", "--set", "data.root=/nowhere"], "data.root"),
        (["--overwrite", "--set", "model.name=monai", "--set", "model.kwargs={}"], "model.name"),
        (["--overwrite", "--minutes", "0"], "--minutes"),
        (["--overwrite", "--directions", "t1-flair"], "--directions"),
        (["--overwrite", "--directions", ","], "--directions"),
    ],
)
def test_bad_requests_fail_with_one_line(top_out: Path, capsys, extra: list[str], fault: str):
    before = (top_out / "report.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(top_out), *TINY, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("idm3d: error:")
    assert fault in err[0]
    assert (top_out / "report.json").stat().st_mtime_ns == before  # nothing was touched


@pytest.mark.parametrize(("slope", "offset"), [(-0.6, -0.1), (1.5, 0.25)])
def test_linear_map_recovers_a_linear_relation(slope: float, offset: float):
    gen = torch.Generator().manual_seed(0)
    source = torch.rand(8, 9, 10, generator=gen) * 2 - 1
    mask = torch.rand(8, 9, 10, generator=gen) > 0.4
    target = torch.where(mask, slope * source + offset, torch.full_like(source, -1.0))
    fitted = fit_linear_map(source, target, mask, lo=-10.0, hi=10.0)
    assert fitted.slope == pytest.approx(slope, abs=1e-6)
    assert fitted.offset == pytest.approx(offset, abs=1e-6)
    assert fitted.background == -1.0
    assert fitted.voxels == int(mask.sum())
    assert torch.allclose(fitted(source, mask), target, atol=1e-5)


def test_linear_map_rejects_a_constant_source():
    with pytest.raises(DataError, match="varying source"):
        fit_linear_map(torch.zeros(4, 4, 4), torch.ones(4, 4, 4), torch.ones(4, 4, 4, dtype=torch.bool))
