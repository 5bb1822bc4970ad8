"""``idm3d detect`` reads every format the data layer reads (NRRD, MetaImage, DICOM series, NIfTI) through the same
reader, with the same one-line refusals; a phantom written in each format is judged as the same volume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ct_fixtures import ct_phantom, tiny_ct_config, write_ct_folder, write_dicom_series, write_itk, write_nifti
from helpers import torch_threads
from idm3d.cli.main import main
from idm3d.detect.inputs import _siblings, read_inputs
from idm3d.errors import DataError
from idm3d.runs.load import load_run

SHAPE = (24, 20, 12)


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory) -> Path:
    """A 1-step unconditional CT run (HU window) trained on one case per format."""
    base = tmp_path_factory.mktemp("detect-ct")
    root = write_ct_folder(base / "data", shape=SHAPE)
    cfg = tiny_ct_config(root)
    (base / "ct.yaml").write_text(yaml.safe_dump(cfg))
    with torch_threads(1):
        assert main(["train", "--config", str(base / "ct.yaml"), "--out", str(base / "run")]) == 0
    return base / "run"


def _one_phantom_in_every_format(folder: Path, seed: int) -> list[Path]:
    hu = ct_phantom(SHAPE, seed=seed)
    return [write_nifti(folder / f"p{seed}_ct.nii.gz", hu), write_itk(folder / f"p{seed}_ct.nrrd", hu),
            write_itk(folder / f"p{seed}_ct.mha", hu), write_dicom_series(folder / f"p{seed}_ct", hu)]


def test_every_format_is_read_as_the_same_volume_and_scored(ct_run: Path, tmp_path: Path, capsys):
    paths = _one_phantom_in_every_format(tmp_path, seed=5)
    run = load_run(ct_run, device="cpu")
    inputs = read_inputs(run, paths)
    # Oblique, anisotropic NRRD/MHA and a shuffled DICOM series: the same tensors as the NIfTI on the run's grid.
    for item in inputs[1:]:
        assert torch.equal(item.target, inputs[0].target), item.name
        assert torch.equal(item.mask, inputs[0].mask), item.name
    reals = [str(p) for p in _one_phantom_in_every_format(tmp_path / "real", seed=6)[:2]]
    with torch_threads(1):
        rc = main(["detect", "score", "--run", str(ct_run), str(paths[2]), str(paths[3]), "--real", *reals,
                   "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = yaml.safe_load(out.out)
    assert [r["file"] for r in rows] == [str(paths[2]), str(paths[3])]
    assert rows[0]["zero_shot"] == pytest.approx(rows[1]["zero_shot"], rel=1e-6)  # same volume, same score


@pytest.mark.parametrize("fault", ["missing_slice", "no_dicom", "not_a_volume", "truncated_nrrd"])
def test_bad_files_are_the_readers_one_line(ct_run: Path, tmp_path: Path, capsys, fault: str):
    hu = ct_phantom(SHAPE, seed=1)
    reals = [str(p) for p in _one_phantom_in_every_format(tmp_path / "real", seed=2)[:2]]
    if fault == "missing_slice":
        bad = write_dicom_series(tmp_path / "gap_ct", hu, skip=(5,))
        expected = f"{bad}: 1 slice(s) missing"
    elif fault == "no_dicom":
        bad = tmp_path / "empty_ct"
        bad.mkdir()
        (bad / "notes.txt").write_text("hello")
        expected = f"{bad}: folder holds no DICOM files"
    elif fault == "not_a_volume":
        bad = tmp_path / "scan_ct.txt"
        bad.write_text("hello")
        expected = f"{bad}: not a volume"
    else:
        bad = write_itk(tmp_path / "cut_ct.nrrd", hu)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        expected = f"{bad}: "
    assert main(["detect", "score", "--run", str(ct_run), str(bad), "--real", *reals]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"idm3d: error: {expected}")
    assert "\n" not in err


def test_sources_next_to_a_target_are_found_in_any_format(tmp_path: Path):
    hu = ct_phantom(SHAPE, seed=3)
    target = write_itk(tmp_path / "case1_ctc.nrrd", hu)
    source = write_dicom_series(tmp_path / "case1_ct", hu)
    assert _siblings(target, "ctc", ["ct"]) == {"ct": source}
    write_itk(tmp_path / "case1_ct.mha", hu)
    with pytest.raises(DataError, match=r"case1_ctc\.nrrd: several ct volumes next to it \(case1_ct, case1_ct\.mha\)"):
        _siblings(target, "ctc", ["ct"])
    with pytest.raises(DataError, match=r"source volume .*case1_t1\.nrrd not found"):
        _siblings(target, "ctc", ["t1"])
