"""Runs trained with coordinate channels and the patch-size mix: the setting travels with the run, ``idm3d
sample`` / ``evaluate`` use it on grids larger than any training patch (up to 128^3 at tiny width), and a
run saved before ``data.patch`` existed still loads and samples."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import idm3d
from helpers import BRATS_AFFINE, tiny_run_config, torch_threads, write_brats_folder
from idm3d.cli.main import main
from idm3d.diffusion.coordinates import position_of

PATCH = [16, 16, 16]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _train(base: Path, root: Path, name: str, patch: dict | None) -> Path:
    data = {"root": str(root), "task": "translate", "sources": ["t1"], "targets": ["t2"], "patch_size": PATCH}
    if patch is not None:
        data["patch"] = patch
    cfg = base / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config(data, {"log": {"tensorboard": False}})))
    run = base / name
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data folder, run with coordinates + mixed schedule, run without the data.patch section)."""
    base = tmp_path_factory.mktemp("patches")
    root = write_brats_folder(base / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        coords = _train(base, root, "coords", {"coordinates": True, "schedule": "mixed"})
        old = _train(base, root, "old", None)
    finally:
        torch.set_num_threads(threads)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["data"]["patch"]  # as written before the section existed
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    return root, coords, old


def test_the_run_records_the_setting_and_its_network_takes_three_more_channels(runs):
    _, coords, _ = runs
    saved = yaml.safe_load((coords / "config.yaml").read_text())
    assert saved["data"]["patch"] == {"coordinates": True, "schedule": "mixed"}
    run = idm3d.load_run(coords, device="cpu")
    assert run.pipeline.coordinates
    first = next(p for p in run.model.parameters() if p.ndim == 5)
    assert first.shape[1] == 5  # noisy t2, t1, three coordinates


def test_sampling_a_grid_larger_than_any_training_patch_uses_the_position(runs):
    _, coords, _ = runs
    run = idm3d.load_run(coords, device="cpu")
    condition = torch.linspace(-1, 1, 32 * 24 * 16).reshape(1, 1, 32, 24, 16)
    whole = run.infer(condition=condition, seed=1)
    assert whole.shape == (1, 1, 32, 24, 16)
    assert torch.isfinite(whole).all()
    # The same grid placed elsewhere in a larger volume gets other coordinates, hence another output.
    elsewhere = run.infer(condition=condition, seed=1, position=position_of((8, 8, 8), (48, 40, 32)))
    assert not torch.allclose(whole, elsewhere)
    # Patch-wise sampling windows the coordinate channels with the rest of the input.
    windowed = idm3d.load_run(coords, device="cpu", roi_size=[16, 16, 16]).infer(condition=condition, seed=1)
    assert windowed.shape == whole.shape


def test_sample_and_evaluate_commands_use_the_coordinates(runs, tmp_path: Path):
    root, coords, _ = runs
    t1 = next(root.glob("*/*_t1.nii.gz"))
    out = tmp_path / "t2.nii.gz"
    assert main(["sample", "--run", str(coords), "--condition", str(t1), "--out", str(out), "--no-progress"]) == 0
    assert np.isfinite(np.asarray(nib.load(str(out)).dataobj)).all()
    assert main(["evaluate", "--run", str(coords), "--no-progress"]) == 0
    report = json.loads((coords / "eval-test.json").read_text())
    assert 0.0 < report["summary"]["t2"]["ssim_mask"]["mean"] <= 1.0


def test_an_old_run_without_the_patch_section_loads_and_samples(runs, tmp_path: Path):
    root, _, old = runs
    run = idm3d.load_run(old, device="cpu")
    assert not run.pipeline.coordinates
    assert next(p for p in run.model.parameters() if p.ndim == 5).shape[1] == 2
    assert run.infer(condition=torch.zeros(1, 1, 24, 24, 24)).shape == (1, 1, 24, 24, 24)
    t1 = next(root.glob("*/*_t1.nii.gz"))
    out = tmp_path / "old.nii.gz"
    assert main(["sample", "--run", str(old), "--condition", str(t1), "--out", str(out), "--no-progress"]) == 0
    assert nib.load(str(out)).shape == nib.load(str(t1)).shape
    assert np.allclose(nib.load(str(out)).affine, BRATS_AFFINE)


def test_whole_volume_sampling_of_128_cubed_in_one_pass_at_tiny_width(runs):
    _, coords, _ = runs
    run = idm3d.load_run(coords, device="cpu", steps=1)
    out = run.infer(condition=torch.zeros(1, 1, 128, 128, 128))
    assert out.shape == (1, 1, 128, 128, 128)
    assert torch.isfinite(out).all()


def test_the_training_preview_samples_its_patch_at_its_position(runs, tmp_path: Path):
    from idm3d.training.preview import preview_volumes
    from idm3d.training.trainer import Trainer

    _, coords, _ = runs
    cfg = idm3d.load_config(coords / "config.yaml")
    trainer = Trainer(cfg, tmp_path / "unused")
    assert trainer._inputs(0)["position"].shape == (1, 2, 3)
    shown = preview_volumes(cfg, trainer.model, trainer.ema, trainer.data, torch.device("cpu"))
    assert set(shown) == {"source_t1", "target_t2", "sample_t2"}
    assert shown["sample_t2"].shape == shown["target_t2"].shape
