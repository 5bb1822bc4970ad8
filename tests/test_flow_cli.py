"""Rectified-flow runs end to end: ``idm3d train`` with ``diffusion.kind: rflow``, ``idm3d sample --steps 4``,
``evaluate``, resume, ``load_run``, detection features, and the one-line refusal of the other objective's sampler."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import idm3d
from helpers import t1_to_t2, tiny_run_config, torch_threads, write_brats_folder
from idm3d.cli.main import main
from idm3d.diffusion.detection import FEATURE_NAMES, detection_features
from idm3d.diffusion.solvers import FlowSolver


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, run folder) of a 3-step rflow translation run (EMA, previews) trained through the CLI."""
    base = tmp_path_factory.mktemp("flow")
    root = write_brats_folder(base / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    cfg = tiny_run_config(
        t1_to_t2(root), sample={"sampler": "heun", "steps": 3},
        diffusion={"kind": "rflow", "num_train_timesteps": 100, "sample_method": "logit-normal",
                   "use_timestep_transform": True, "base_img_size_numel": 8 * 8 * 8},
    )
    (base / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with torch_threads(1):
        assert main(["train", "--config", str(base / "cfg.yaml"), "--out", str(base / "run")]) == 0
    return root, base / "run"


def test_flow_run_records_its_objective_and_resumes(flow_run, tmp_path: Path):
    _, run = flow_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["diffusion"]["kind"] == "rflow"
    assert saved["diffusion"]["prediction_type"] == "flow"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses
    assert all(np.isfinite(losses))
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run, copy)
    assert main(["train", "--config", str(copy / "config.yaml"), "--out", str(copy), "--resume",
                 "--set", "train.max_steps=4"]) == 0


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sample_steps_4_writes_a_volume(flow_run, tmp_path: Path, sampler: str):
    root, run = flow_run
    case = sorted(p for p in root.iterdir() if p.is_dir())[0]
    t1 = next(case.glob("*t1.nii.gz"))
    out = tmp_path / "t2.nii.gz"
    assert main(["sample", "--run", str(run), "--condition", str(t1), "--out", str(out), "--steps", "4",
                 "--sampler", sampler, "--no-progress"]) == 0
    data = np.asarray(nib.load(str(out)).dataobj)
    assert data.shape == (24, 24, 24)
    assert np.isfinite(data).all()


def test_wrong_objective_sampler_is_refused_in_one_line(flow_run, tmp_path: Path, capsys):
    root, run = flow_run
    t1 = next(sorted(p for p in root.iterdir() if p.is_dir())[0].glob("*t1.nii.gz"))
    assert main(["sample", "--run", str(run), "--condition", str(t1), "--out", str(tmp_path / "x.nii.gz"),
                 "--sampler", "ddim"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "sample.sampler" in err
    assert "euler|heun" in err


def test_load_run_invert_and_detection_features(flow_run):
    _, run = flow_run
    loaded = idm3d.load_run(run, steps=4, sampler="heun")
    solver = loaded.scheduler()
    assert isinstance(solver, FlowSolver)
    assert solver.steps == 3  # 4 calls: Euler, Heun, Euler
    assert loaded.pipeline.prediction_type == "flow"
    x0 = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    cond = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    feats = detection_features(loaded.pipeline, x0, cond, scheduler=solver)
    assert set(feats) == set(FEATURE_NAMES)
    assert all(np.isfinite(list(feats.values())))
    report = idm3d.evaluate_run(run, "test", steps=2, progress=False) if hasattr(idm3d, "evaluate_run") else None
    if report is not None:
        assert report["sampler"] == "heun"
        assert report["steps"] == 2
