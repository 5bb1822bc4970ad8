"""``idm3d sample --input-dir`` / ``--num``: one output per case (or seed), resumable, bad cases reported
without losing the others; outputs equal what single-volume ``idm3d sample`` writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers import BRATS_AFFINE, phantom, tiny_run_config, write_brats_folder, write_volume
from idm3d.cli.main import main


def _train(base: Path, name: str, data: dict) -> Path:
    cfg = tiny_run_config(data, {"max_steps": 2, "log": {"tensorboard": False}}, {"seed": 3})
    path = base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", str(path), "--out", str(base / name)]) == 0
    finally:
        torch.set_num_threads(threads)
    return base / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data folder, translation run t1 -> t2, unconditional t1 run), each trained for 2 steps."""
    base = tmp_path_factory.mktemp("batch")
    root = write_brats_folder(base / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    translate = _train(base, "t1t2", {"root": str(root), "task": "translate", "sources": ["t1"], "targets": ["t2"]})
    generate = _train(base, "gen", {"root": str(root), "task": "generate", "targets": ["t1"]})
    return root, translate, generate


def _cases(root: Path, tmp_path: Path) -> Path:
    """Two good cases (one on another grid and affine), one unreadable, one without a T1."""
    cases = tmp_path / "cases"
    for case in ("BraTS20_Training_001", "BraTS20_Training_002"):
        shutil.copytree(root / case, cases / case)
    other = np.diag([1.2, 1.0, 1.1, 1.0])
    other[:3, 3] = [5.0, -3.0, 2.0]
    write_volume(cases / "odd_grid" / "odd_grid_t1.nii.gz", phantom((28, 20, 24), "t1", seed=7), other)
    bad = cases / "broken" / "broken_t1.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a nifti at all")
    write_volume(cases / "no_t1" / "no_t1_t2.nii.gz", phantom((24, 24, 24), "t2"))
    return cases


def test_input_dir_translates_each_case_on_its_grid_and_survives_bad_ones(runs, tmp_path: Path, capsys):
    root, run, _ = runs
    cases, out = _cases(root, tmp_path), tmp_path / "out"
    args = ["sample", "--run", str(run), "--input-dir", str(cases), "--out", str(out), "--no-progress"]
    assert main(args) == 1  # two cases failed, the others were written
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("idm3d: error: ")]
    assert len(lines) == 3
    assert any(line.startswith("idm3d: error: broken: ") and "broken_t1.nii.gz" in line for line in lines)
    assert any(line.startswith("idm3d: error: no_t1: ") and "no t1 file" in line for line in lines)
    assert lines[-1] == "idm3d: error: 2 case(s) failed: no_t1, broken"
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == ["BraTS20_Training_001.nii.gz", "BraTS20_Training_002.nii.gz", "odd_grid.nii.gz"]
    odd = nib.load(str(out / "odd_grid.nii.gz"))
    assert odd.shape == (28, 20, 24)
    assert np.allclose(odd.affine, nib.load(str(cases / "odd_grid" / "odd_grid_t1.nii.gz")).affine)
    assert np.allclose(nib.load(str(out / "BraTS20_Training_002.nii.gz")).affine, BRATS_AFFINE)
    manifest = json.loads((out / "samples.json").read_text())
    assert sorted(manifest["outputs"]) == ["BraTS20_Training_001", "BraTS20_Training_002", "odd_grid"]
    assert manifest["outputs"]["odd_grid"]["seed"] == 3
    assert manifest["weights"] == "ema"
    assert manifest["steps"] == 2

    # The batch writes what single-volume sampling writes for the same case.
    single = tmp_path / "single.nii.gz"
    t1 = cases / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    assert main(["sample", "--run", str(run), "--condition", str(t1), "--out", str(single), "--no-progress"]) == 0
    assert np.array_equal(nib.load(str(single)).get_fdata(),
                          nib.load(str(out / "BraTS20_Training_002.nii.gz")).get_fdata())

    # Rerun: finished cases are skipped; with the bad cases gone it succeeds.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    shutil.rmtree(cases / "broken")
    shutil.rmtree(cases / "no_t1")
    capsys.readouterr()
    assert main(args) == 0
    assert "0 file(s) written, 3 already done" in capsys.readouterr().err
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}


def test_num_writes_seeded_samples_and_resumes(runs, tmp_path: Path, capsys):
    _, _, run = runs
    out = tmp_path / "samples"
    base = ["sample", "--run", str(run), "--out", str(out), "--seed", "10", "--no-progress"]
    assert main([*base, "--num", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sample_0000.nii.gz", "sample_0001.nii.gz"]
    manifest = json.loads((out / "samples.json").read_text())
    assert {k: v["seed"] for k, v in manifest["outputs"].items()} == {"sample_0000": 10, "sample_0001": 11}
    a, b = (nib.load(str(out / f"sample_000{i}.nii.gz")).get_fdata() for i in (0, 1))
    assert not np.array_equal(a, b)
    single = tmp_path / "one.nii.gz"
    assert main(["sample", "--run", str(run), "--out", str(single), "--seed", "11", "--no-progress"]) == 0
    assert np.array_equal(nib.load(str(single)).get_fdata(), b)
    assert nib.load(str(single)).shape == b.shape
    capsys.readouterr()
    assert main([*base, "--num", "3"]) == 0  # extends the set: only sample_0002 is new
    assert "1 file(s) written, 2 already done" in capsys.readouterr().err
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["outputs"]["sample_0002"]["seed"] == 12
    assert sorted(manifest["outputs"]) == ["sample_0000", "sample_0001", "sample_0002"]


@pytest.mark.parametrize(
    ("which", "args", "fault"),
    [
        ("translate", ["--num", "2"], "--num: this run translates ['t1'] -> ['t2']; use --input-dir"),
        ("generate", ["--input-dir", "{tmp}"], "--input-dir: this run generates unconditionally; use --num N"),
        ("generate", ["--num", "0"], "--num: expected a count >= 1, got 0"),
        ("translate", ["--input-dir", "{tmp}/none"], "data folder not found"),
        ("generate", ["--num", "2", "--out", "{tmp}/x.nii.gz"], "OUT is a folder"),
        ("generate", ["--num", "2", "--out", "{tmp}/x.mha"], "OUT is a folder"),
        ("generate", ["--num", "2", "--out-format", "png"], "--out-format: expected one of"),
        ("generate", ["--out-format", "mha"], "--out-format: only with --input-dir or --num"),
    ],
)
def test_batch_errors_are_one_line(runs, tmp_path: Path, capsys, which, args, fault):
    run = runs[1] if which == "translate" else runs[2]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    assert main(["sample", "--run", str(run), *out, *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idm3d: error: ")
    assert fault in err
    assert "\n" not in err
