"""Batch sampling's output format (``out_format``): the input's format per case, or one named format; each output
keeps its case's spacing, direction and origin, and equals what single-case sampling writes for that case."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from ct_fixtures import BONE, ct_phantom, tiny_ct_config, write_dicom_series, write_itk
from helpers import torch_threads
from idm3d.cli.main import main
from idm3d.data.readers import image_format, load_image
from idm3d.errors import ConfigError
from idm3d.inference.batch import output_suffix, sample_folder
from idm3d.inference.generate import write_sample
from idm3d.runs.load import load_run

SHAPE = (24, 20, 12)


@pytest.fixture(scope="module")
def ct_translation(tmp_path_factory) -> tuple[Path, Path]:
    """(cases, run): a 1-step CT -> contrast-CT run; the sources are an MHA, a DICOM series and an NRRD."""
    base = tmp_path_factory.mktemp("batch-ct")
    root = base / "cases"
    for i, fmt in enumerate(("mha", "dicom", "nrrd")):
        hu = ct_phantom(SHAPE, seed=i)
        case = root / f"case{i}"
        if fmt == "dicom":
            write_dicom_series(case / f"case{i}_ct", hu)
        else:
            write_itk(case / f"case{i}_ct.{fmt}", hu)
        write_itk(case / f"case{i}_ctc.nrrd", np.where(hu > 0, np.minimum(hu + 60, BONE), hu))
    cfg = tiny_ct_config(root, task="translate", sources=["ct"], targets=["ctc"], test_fraction=0.34)
    (base / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with torch_threads(1):
        assert main(["train", "--config", str(base / "cfg.yaml"), "--out", str(base / "run")]) == 0
    return root, base / "run"


def _geometry(path: Path) -> tuple[tuple[float, ...], ...]:
    image = sitk.ReadImage(str(path))
    return image.GetSpacing(), image.GetOrigin(), image.GetDirection(), image.GetSize()


def test_input_format_round_trip_keeps_each_cases_geometry(ct_translation, tmp_path: Path):
    root, run_dir = ct_translation
    run = load_run(run_dir, device="cpu")
    out = tmp_path / "out"
    with torch_threads(1):
        result = sample_folder(run, root, out, progress=False, out_format="input")
    assert result.ok, result.failed
    assert sorted(p.name for p in result.written) == ["case0.mha", "case1", "case2.nrrd"]
    assert [image_format(p) for p in sorted(result.written)] == ["metaimage", "dicom", "nrrd"]
    mha_in = root / "case0" / "case0_ct.mha"
    # The MHA written back holds the input's oblique direction, anisotropic spacing and origin exactly.
    for got, want in zip(_geometry(out / "case0.mha"), _geometry(mha_in)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    for name, source in (("case1", root / "case1" / "case1_ct"), ("case2.nrrd", root / "case2" / "case2_ct.nrrd")):
        np.testing.assert_allclose(load_image(out / name)[1], load_image(source)[1], rtol=0, atol=1e-9)
    # What single-case sampling writes for that case, voxel for voxel (same run, seed and grid).
    with torch_threads(1):
        single = write_sample(run, tmp_path / "single.mha", {"ct": mha_in}, png=False)[0]
    batch_data, single_data = load_image(out / "case0.mha")[0], load_image(single)[0]
    assert np.array_equal(batch_data, single_data)
    assert batch_data.min() >= -1000.5  # HU, not [-1, 1]
    assert batch_data.max() - batch_data.min() > 100
    # Resumable in every format: a DICOM folder is moved into place whole, so an existing one is complete.
    again = sample_folder(run, root, out, progress=False, out_format="input")
    assert (again.written, sorted(again.skipped)) == ([], ["case0", "case1", "case2"])
    # One named format for every case, whatever its input, through the CLI.
    with torch_threads(1):
        code = main(["sample", str(run_dir), "--input-dir", str(root), "--out", str(tmp_path / "nrrd"),
                     "--out-format", "nrrd", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "nrrd").glob("*.nrrd")) == ["case0.nrrd", "case1.nrrd", "case2.nrrd"]
    assert np.array_equal(load_image(tmp_path / "nrrd" / "case0.nrrd")[0], batch_data)


def _stub(intensity: str, sources: list[str]) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(intensity=intensity)), sources=sources)


def test_the_suffix_rule_and_its_one_line_refusals(tmp_path: Path):
    mri, ct, gen = _stub("percentile", ["t1"]), _stub("ct", ["ct"]), _stub("percentile", [])
    dicom = write_dicom_series(tmp_path / "case_ct", ct_phantom((8, 8, 4)))
    assert output_suffix(ct, "input", dicom) == ""  # a CT run writes a DICOM input back as a DICOM series
    assert output_suffix(mri, "input", dicom) == ".nii.gz"  # other runs: NIfTI (the DICOM writer is CT in HU)
    assert output_suffix(mri, "input", tmp_path / "a_t1.nii") == ".nii"
    assert output_suffix(mri, "input", tmp_path / "a_t1.mhd") == ".mha"  # single-file: atomic, so resumable
    assert output_suffix(mri, "input", tmp_path / "a_t1.nhdr") == ".nrrd"
    for run, fmt, text in ((mri, "dicom", "--out-format dicom: only data.intensity: ct runs"),
                           (gen, "input", "--out-format input: unconditional samples have no input"),
                           (ct, "tiff", "--out-format: expected one of nifti|nrrd|mha|dicom|input, got 'tiff'")):
        with pytest.raises(ConfigError, match="^" + text.replace("|", r"\|")):
            output_suffix(run, fmt)
