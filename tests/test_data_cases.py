"""Finding cases (BraTS2020 and generic layouts), check_dataset and `idm3d data check`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import BRATS_AFFINE, phantom, write_brats_folder, write_volume
from idm3d.cli.main import main
from idm3d.data.cases import check_dataset, detect_layout, find_cases, load_case, parse_modalities, scan_cases
from idm3d.errors import DataError


def test_brats_layout_found_in_requested_order(brats_dir: Path) -> None:
    cases = find_cases(brats_dir, ("t2", "t1", "flair"))
    assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    assert cases[0].modalities == ("t2", "t1", "flair")
    # "t1" must not pick the t1ce file.
    assert cases[0].files["t1"].name == "BraTS20_Training_001_t1.nii.gz"
    assert detect_layout(cases) == "brats2020"
    assert check_dataset(brats_dir, ("t1", "t1ce", "t2", "flair", "seg")) == []


def test_generic_layout_suffix_and_bare_names(tmp_path: Path) -> None:
    root = tmp_path / "generic"
    write_volume(root / "alice" / "alice_T1.nii.gz", phantom((16, 16, 16), "t1"))
    write_volume(root / "alice" / "alice_t2.nii", phantom((16, 16, 16), "t2"))
    write_volume(root / "bob" / "t1.nii.gz", phantom((16, 16, 16), "t1", seed=2))
    write_volume(root / "bob" / "t2.nii.gz", phantom((16, 16, 16), "t2", seed=2))
    (root / "notes.csv").write_text("ignored\n")
    cases = find_cases(root, "t1,t2")
    assert [(c.case_id, c.files["t1"].name, c.files["t2"].name) for c in cases] == [
        ("alice", "alice_T1.nii.gz", "alice_t2.nii"),
        ("bob", "t1.nii.gz", "t2.nii.gz"),
    ]
    assert detect_layout(cases) == "generic"
    assert check_dataset(root, ("t1", "t2")) == []


def test_flat_folder_is_one_case(tmp_path: Path) -> None:
    write_volume(tmp_path / "s_t1.nii.gz", phantom((16, 16, 16), "t1"))
    write_volume(tmp_path / "s_t2.nii.gz", phantom((16, 16, 16), "t2"))
    (case,) = find_cases(tmp_path, ("t1", "t2"))
    assert case.case_id == tmp_path.name


def _load_all(root: Path, modalities: tuple[str, ...]) -> None:
    for case in find_cases(root, modalities):
        load_case(case)


def _problems_of(root: Path, modalities: tuple[str, ...] = ("t1", "t2")) -> list[str]:
    """check_dataset's lines, after checking that loading the same folder raises DataError."""
    problems = check_dataset(root, modalities)
    with pytest.raises(DataError):
        _load_all(root, modalities)
    return problems


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    assert _problems_of(tmp_path / "absent") == [f"{tmp_path / 'absent'}: data folder not found"]
    (tmp_path / "empty").mkdir()
    (problem,) = _problems_of(tmp_path / "empty")
    assert str(tmp_path / "empty") in problem
    assert "empty" in problem


def test_wrapper_folder_gets_a_hint(brats_dir: Path, tmp_path: Path) -> None:
    wrapper = tmp_path / "wrapper"
    shutil.move(str(brats_dir), str(wrapper / "MICCAI_BraTS2020_TrainingData"))
    (problem,) = _problems_of(wrapper)
    assert "did you mean" in problem
    assert "MICCAI_BraTS2020_TrainingData" in problem


def test_missing_modality_names_case_and_modality(brats_dir: Path) -> None:
    (brats_dir / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz").unlink()
    (problem,) = _problems_of(brats_dir)
    assert "BraTS20_Training_002" in problem
    assert "no t2 file" in problem


def test_duplicate_modality_file(brats_dir: Path) -> None:
    case = brats_dir / "BraTS20_Training_001"
    shutil.copy(case / "BraTS20_Training_001_t1.nii.gz", case / "BraTS20_Training_001_t1.nii")
    (problem,) = _problems_of(brats_dir)
    assert "several t1 files" in problem
    assert "BraTS20_Training_001_t1.nii," in problem


def test_shape_mismatch_names_both_files(brats_dir: Path) -> None:
    t2 = brats_dir / "BraTS20_Training_003" / "BraTS20_Training_003_t2.nii.gz"
    write_volume(t2, phantom((20, 24, 18), "t2"))
    (problem,) = _problems_of(brats_dir)
    assert problem.startswith(str(t2))
    assert "BraTS20_Training_003_t1.nii.gz" in problem
    assert "shape" in problem


def test_affine_mismatch_names_both_files(brats_dir: Path) -> None:
    t2 = brats_dir / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz"
    shifted = BRATS_AFFINE.copy()
    shifted[0, 3] += 1.5
    write_volume(t2, phantom((20, 24, 16), "t2"), shifted)
    (problem,) = _problems_of(brats_dir)
    assert problem.startswith(str(t2))
    assert "BraTS20_Training_001_t1.nii.gz" in problem
    assert "affine" in problem


def test_check_dataset_lists_every_problem_once(brats_dir: Path) -> None:
    (brats_dir / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii.gz").write_text("oops")
    nan = phantom((20, 24, 16), "t1")
    nan[5, 5, 5] = np.nan
    write_volume(brats_dir / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz", nan)
    (brats_dir / "BraTS20_Training_003" / "BraTS20_Training_003_t1.nii.gz").unlink()
    problems = check_dataset(brats_dir, ("t1", "t2"))
    assert len(problems) == 3
    assert any("001_t2.nii.gz" in p and "not a gzip" in p for p in problems)
    assert any("002_t1.nii.gz" in p and "NaN" in p for p in problems)
    assert any("BraTS20_Training_003" in p and "no t1 file" in p for p in problems)
    # Header-only mode skips the voxel checks but still sees unreadable files and missing modalities.
    quick = check_dataset(brats_dir, ("t1", "t2"), deep=False)
    assert len(quick) == 2
    assert not any("NaN" in p for p in quick)


def test_seg_may_be_empty_but_images_may_not(brats_dir: Path) -> None:
    case = brats_dir / "BraTS20_Training_001"
    write_volume(case / "BraTS20_Training_001_seg.nii.gz", np.zeros((20, 24, 16), np.int16))
    write_volume(case / "BraTS20_Training_001_flair.nii.gz", np.zeros((20, 24, 16), np.float32))
    (problem,) = check_dataset(brats_dir, ("flair", "seg"))
    assert "BraTS20_Training_001_flair.nii.gz" in problem
    assert "constant" in problem


@pytest.mark.parametrize("bad", ["", "t1,,t2", "t1,T1", "../t1"])
def test_parse_modalities_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^modalities: "):
        parse_modalities(bad)


def test_scan_cases_does_not_open_files(tmp_path: Path) -> None:
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "c1_t1.nii.gz").write_text("not opened by scan")
    (tmp_path / "c1" / "c1_t2.nii.gz").write_text("not opened by scan")
    cases, problems = scan_cases(tmp_path, ("t1", "t2"))
    assert len(cases) == 1
    assert problems == []


# --- command line -------------------------------------------------------------------------------


def test_cli_clean_folder_exit_0(brats_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(brats_dir), "--modalities", "t1,t2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("OK: 3 case(s)")
    assert "BraTS2020" in out[0]


def test_cli_problems_exit_2_one_line_each(brats_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = brats_dir / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    (brats_dir / "BraTS20_Training_003" / "BraTS20_Training_003_t2.nii.gz").unlink()
    assert main(["data", "check", str(brats_dir)]) == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(str(bad))
    assert "truncated" in lines[0]
    assert "BraTS20_Training_003" in lines[1]
    assert "no t2 file" in lines[1]
    assert "2 problem(s)" in captured.err


def test_cli_quick_and_bad_option(brats_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(brats_dir), "--quick", "--modalities", "flair"]) == 0
    assert "headers" in capsys.readouterr().out
    assert main(["data", "check", str(brats_dir), "--modalities", "t1,,t2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("idm3d: error: modalities")


def test_cli_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'nowhere'}: data folder not found"


def test_write_brats_folder_helper_is_configurable(tmp_path: Path) -> None:
    root = write_brats_folder(tmp_path / "small", n_cases=2, shape=(16, 16, 16), modalities=("t1", "t2"), suffix=".nii")
    assert sorted(p.name for p in (root / "BraTS20_Training_002").iterdir()) == [
        "BraTS20_Training_002_t1.nii",
        "BraTS20_Training_002_t2.nii",
    ]
    assert check_dataset(root, ("t1", "t2")) == []
