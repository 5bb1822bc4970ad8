"""One reader for NIfTI, NRRD, MetaImage and DICOM series: geometry kept exactly, HU exact, faults in one line."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ct_fixtures import (
    ITK_SPACING,
    ct_phantom,
    dicom_affine,
    write_dicom_series,
    write_itk,
    write_nifti,
    write_non_image_dicom,
)
from idm3d.data.cases import check_dataset, find_cases
from idm3d.data.readers import image_format, load_image, read_image_header, save_image
from idm3d.errors import DataError

SHAPE = (24, 20, 12)
# The fixtures' DICOM positions are written as 10-digit decimal strings (DICOM DS): a nanometre of rounding.
GEOMETRY_ATOL = 1e-6


@pytest.fixture(scope="module")
def hu() -> np.ndarray:
    return ct_phantom(SHAPE)


def _write(kind: str, folder: Path, hu: np.ndarray) -> Path:
    if kind == "dicom":
        return write_dicom_series(folder / "scan_ct", hu)
    if kind == "nifti":
        return write_nifti(folder / "scan_ct.nii.gz", hu)
    return write_itk(folder / f"scan_ct.{kind}", hu)


@pytest.mark.parametrize("kind", ["dicom", "nrrd", "nhdr", "mha", "mhd", "nifti"])
def test_every_format_reads_hu_and_geometry_exactly(tmp_path: Path, hu, kind):
    path = _write(kind, tmp_path, hu)
    data, affine = load_image(path)
    np.testing.assert_array_equal(data, hu)  # integer HU: rescale slope/intercept applied exactly
    np.testing.assert_allclose(affine, dicom_affine(), atol=GEOMETRY_ATOL)
    header = read_image_header(path)
    assert header.shape == SHAPE
    np.testing.assert_allclose(header.affine, affine, atol=GEOMETRY_ATOL)
    if kind != "nifti":
        np.testing.assert_allclose(header.zooms, ITK_SPACING, atol=GEOMETRY_ATOL)
    assert abs(affine[0, 1]) > 0.05
    assert abs(affine[2, 1]) > 0.05


@pytest.mark.parametrize("out", ["o.nrrd", "o.nhdr", "o.mha", "o.mhd", "o.nii.gz", "series"])
def test_write_then_read_keeps_geometry_and_values(tmp_path: Path, hu, out):
    data, affine = load_image(write_dicom_series(tmp_path / "in", hu))
    written = save_image(tmp_path / out, data, affine)
    again, again_affine = load_image(written)
    np.testing.assert_allclose(again_affine, affine, atol=GEOMETRY_ATOL)
    np.testing.assert_array_equal(again, data)


def test_dicom_output_is_anonymous_with_new_uids(tmp_path: Path, hu):
    source = write_dicom_series(tmp_path / "in", hu)
    data, affine = load_image(source)
    out = save_image(tmp_path / "out", data, affine)
    original = pydicom.dcmread(next(source.iterdir()))
    files = sorted(out.iterdir())
    assert len(files) == SHAPE[2]
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert str(ds.PatientName) == ""
        assert ds.PatientID == ""
        assert ds.PatientBirthDate == ""
        assert ds.StudyInstanceUID != original.StudyInstanceUID
        assert ds.SeriesInstanceUID != original.SeriesInstanceUID
        assert ds.FrameOfReferenceUID != original.FrameOfReferenceUID
        assert b"Doe" not in f.read_bytes()
        assert b"PID-12345" not in f.read_bytes()
    with pytest.raises(DataError, match="already exists"):
        save_image(out, data, affine)


def _missing_slice(folder: Path, hu: np.ndarray) -> Path:
    return write_dicom_series(folder, hu, skip=[5])


def _mixed_series(folder: Path, hu: np.ndarray) -> Path:
    write_dicom_series(folder, hu)
    other = write_dicom_series(folder.parent / "other", hu, shuffle_names=False)
    for f in list(other.iterdir())[:2]:
        f.rename(folder / f"X{f.name}")
    return folder


def _uneven(folder: Path, hu: np.ndarray) -> Path:
    return write_dicom_series(folder, hu, steps=[2.5] * 5 + [3.1] + [2.5] * 5)


def _non_image(folder: Path, hu: np.ndarray) -> Path:
    write_dicom_series(folder, hu, series_uid="1.2.3.4.5")
    write_non_image_dicom(folder / "report.dcm", "1.2.3.4.5")
    return folder


def _duplicate_position(folder: Path, hu: np.ndarray) -> Path:
    return write_dicom_series(folder, hu, steps=[2.5] * 5 + [0.0] + [2.5] * 5)


def _not_dicom(folder: Path, hu: np.ndarray) -> Path:
    write_dicom_series(folder, hu)
    (folder / "zz.dcm").write_text("not a dicom file\n" * 20)
    return folder


def _truncated_nrrd(folder: Path, hu: np.ndarray) -> Path:
    path = write_itk(folder.with_suffix(".nrrd"), hu)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _truncated_raw_nrrd(folder: Path, hu: np.ndarray) -> Path:
    path = write_itk(folder.with_suffix(".nhdr"), hu)
    raw = path.with_suffix(".raw.gz") if path.with_suffix(".raw.gz").exists() else next(
        p for p in path.parent.iterdir() if p.name.startswith(path.stem) and p != path)
    raw.write_bytes(raw.read_bytes()[:100])
    return path


def _text_mha(folder: Path, hu: np.ndarray) -> Path:
    path = folder.with_suffix(".mha")
    path.write_text("just some text\n")
    return path


def _nan_mha(folder: Path, hu: np.ndarray) -> Path:
    bad = hu.copy()
    bad[3, 3, 3] = np.nan
    return _float_itk(folder, bad)


def _float_itk(folder: Path, data: np.ndarray) -> Path:
    import SimpleITK as sitk

    path = folder.with_suffix(".mha")
    sitk.WriteImage(sitk.GetImageFromArray(data.transpose(2, 1, 0).astype(np.float32)), str(path))
    return path


BROKEN = {
    "missing_slice": (_missing_slice, "1 slice(s) missing between"),
    "mixed_series": (_mixed_series, "holds 2 DICOM series"),
    "uneven_spacing": (_uneven, "uneven slice spacing"),
    "non_image_dicom": (_non_image, "not an image slice"),
    "same_position": (_duplicate_position, "lie at the same position"),
    "not_dicom_named_dcm": (_not_dicom, "not a readable DICOM file"),
    "truncated_nrrd": (_truncated_nrrd, "corrupt, truncated or unreadable NRRD"),
    "truncated_nhdr_data": (_truncated_raw_nrrd, "corrupt, truncated or unreadable NRRD"),
    "text_named_mha": (_text_mha, "MetaImage"),
    "nan_voxel": (_nan_mha, "non-finite voxels (1 NaN"),
}


@pytest.mark.parametrize("fault", list(BROKEN))
def test_broken_inputs_are_one_line_naming_the_file(tmp_path: Path, hu, fault):
    make, text = BROKEN[fault]
    path = make(tmp_path / "case_ct", hu)
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert text in message
    assert "\n" not in message
    assert message.startswith(str(path))


def test_data_check_finds_every_format_and_names_the_broken_case(tmp_path: Path):
    from ct_fixtures import write_ct_folder

    root = write_ct_folder(tmp_path / "ct")
    write_dicom_series(root / "case09", ct_phantom(SHAPE, seed=9))  # a case folder that is one DICOM series
    cases = find_cases(root, ["ct"])
    assert [c.case_id for c in cases] == ["case00", "case01", "case02", "case03", "case09"]
    assert [image_format(c.files["ct"]) for c in cases] == ["dicom", "nrrd", "metaimage", "nifti", "dicom"]
    assert check_dataset(root, ["ct"]) == []
    assert check_dataset(root, ["ct"], deep=False) == []
    next((root / "case00" / "case00_ct").iterdir()).unlink()
    problems = check_dataset(root, ["ct"])
    assert len(problems) == 1
    assert problems[0].startswith(str(root / "case00" / "case00_ct"))


def test_gzip_nifti_still_goes_through_the_nifti_reader(tmp_path: Path, hu):
    path = write_nifti(tmp_path / "a_ct.nii.gz", hu)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()))[:200])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_image(path)
