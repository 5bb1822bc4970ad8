"""Safe NIfTI reading: every fault is one DataError line naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import phantom, write_volume
from idm3d.data.nifti import load_volume, read_header, save_volume
from idm3d.errors import DataError

SHAPE = (12, 10, 8)


def _good(path: Path) -> Path:
    return write_volume(path, phantom(SHAPE, "t1"), np.eye(4))


def _truncated_gz(p: Path) -> Path:
    raw = _good(p).read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _truncated_nii(p: Path) -> Path:
    raw = _good(p).read_bytes()
    p.write_bytes(raw[: len(raw) - 100])
    return p


def _bitflip_gz(p: Path) -> Path:
    raw = bytearray(_good(p).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    raw[len(raw) // 2 + 1] ^= 0xFF
    p.write_bytes(bytes(raw))
    return p


def _text(p: Path) -> Path:
    p.write_text("patient notes, not an image\n" * 30)
    return p


def _gzipped_text(p: Path) -> Path:
    p.write_bytes(gzip.compress(b"just some text " * 50))
    return p


def _png(p: Path) -> Path:
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return p


def _array(data: np.ndarray):
    def write(p: Path) -> Path:
        return write_volume(p, data, np.eye(4))

    return write


def _with(value: float) -> np.ndarray:
    data = phantom(SHAPE, "t1")
    data[3, 4, 5] = value
    return data


FAULTS = {
    "missing": ("missing.nii.gz", lambda p: p, "file not found"),
    "text_as_nii": ("notes.nii", _text, "not a NIfTI"),
    "text_as_nii_gz": ("notes.nii.gz", _text, "not a gzip file"),
    "gzipped_text": ("notes2.nii.gz", _gzipped_text, "not a NIfTI"),
    "png": ("scan.png", _png, "not a NIfTI"),
    "png_named_nii": ("scan.nii", _png, "not a NIfTI"),
    "truncated_gz": ("trunc.nii.gz", _truncated_gz, "truncated"),
    "truncated_nii": ("trunc.nii", _truncated_nii, "truncated"),
    "bitflip_gz": ("flip.nii.gz", _bitflip_gz, "corrupt"),
    "empty_file": ("empty.nii.gz", lambda p: (p.write_bytes(b""), p)[1], "not a"),
    "2d": ("flat.nii.gz", _array(np.ones((12, 10), np.float32) * np.arange(10)), "2D"),
    "single_slice": ("slice.nii.gz", _array(phantom((12, 10, 1), "t1")), "2D"),
    "4d": ("series.nii.gz", _array(np.stack([phantom(SHAPE, "t1")] * 3, -1)), "4D"),
    "nan": ("nan.nii.gz", _array(_with(np.nan)), "NaN"),
    "inf": ("inf.nii.gz", _array(_with(np.inf)), "Inf"),
    "all_zero": ("zero.nii.gz", _array(np.zeros(SHAPE, np.float32)), "constant"),
    "constant": ("const.nii.gz", _array(np.full(SHAPE, 7.0, np.float32)), "constant"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_one_line_data_error_naming_file(tmp_path: Path, fault: str) -> None:
    name, make, fragment = FAULTS[fault]
    path = make(tmp_path / name)
    with pytest.raises(DataError) as info:
        load_volume(path)
    message = str(info.value)
    assert str(tmp_path / name) in message
    assert fragment in message
    assert "\n" not in message


def test_reads_int16_with_scale_factor_and_affine(tmp_path: Path) -> None:
    data = phantom(SHAPE, "t1")
    affine = np.diag([-1.2, 1.0, 2.5, 1.0])
    affine[:3, 3] = [10, -5, 3]
    path = write_volume(tmp_path / "i16.nii.gz", data, affine, as_int16=True)
    assert nib.load(str(path)).get_data_dtype() == np.int16
    loaded, loaded_affine = load_volume(path)
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, np.round(data * 4) / 4, atol=1e-6)
    np.testing.assert_allclose(loaded_affine, affine)


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_trailing_singleton_4d_and_both_nifti_versions_read(tmp_path: Path, image_class, suffix: str) -> None:
    data = phantom(SHAPE, "t2")
    path = tmp_path / f"vol{suffix}"
    nib.save(image_class(data[..., None], np.eye(4)), str(path))
    loaded, _ = load_volume(path)
    assert loaded.shape == SHAPE
    np.testing.assert_array_equal(loaded, data)


def test_constant_allowed_for_label_maps(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "seg.nii.gz", np.zeros(SHAPE, np.int16), np.eye(4))
    loaded, _ = load_volume(path, allow_constant=True)
    assert not loaded.any()


def test_singular_affine_rejected(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "sing.nii", phantom(SHAPE, "t1"), np.eye(4))
    raw = bytearray(path.read_bytes())
    raw[312:328] = np.zeros(4, "<f4").tobytes()  # srow_z = 0: a flat world z
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1: use the sform
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="affine"):
        load_volume(path)


def test_read_header_geometry_and_faults(tmp_path: Path) -> None:
    path = _good(tmp_path / "ok.nii.gz")
    header = read_header(path)
    assert header.shape == SHAPE
    np.testing.assert_allclose(header.affine, np.eye(4))
    for bad in (_text(tmp_path / "t.nii"), tmp_path / "nope.nii.gz"):
        with pytest.raises(DataError, match=str(bad)):
            read_header(bad)


def test_save_volume_roundtrip(tmp_path: Path) -> None:
    data = phantom(SHAPE, "flair")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    out = save_volume(tmp_path / "sub" / "pred.nii.gz", data[None], affine)
    loaded, loaded_affine = load_volume(out)
    np.testing.assert_array_equal(loaded, data)
    np.testing.assert_allclose(loaded_affine, affine)
    assert [p.name for p in out.parent.iterdir()] == ["pred.nii.gz"]  # no temporary file left
