"""A DICOM series given as a folder: checked with pydicom, read with SimpleITK, written back anonymously.

Reading (:func:`load_series`): every file's header is read first (pydicom, no pixels) and the series is
refused, in one line naming the folder or file, when a file is not DICOM or not an image (no rows,
position, orientation or pixel spacing: a report, a structure set), when the folder holds several series
(``SeriesInstanceUID``) or a multi-frame object, when orientations differ, two slices share a position,
slices are missing (a gap that is a multiple of the usual step) or the spacing is uneven. The slices are then
read in position order by SimpleITK (GDCM: compressed transfer syntaxes too), which applies
``RescaleSlope``/``RescaleIntercept``, so CT values are Hounsfield units. The geometry is built from the
headers: in-plane from ``ImageOrientationPatient`` and ``PixelSpacing``, the slice axis from the first and
last ``ImagePositionPatient`` (a gantry tilt stays a sheared but exact affine).

Writing (:func:`save_series`): CT Image Storage, int16 with slope 1 (or a slope that fits the range), new
Study/Series/SOP/Frame-of-Reference UIDs; patient attributes are present but empty. Nothing is copied from
an input series: only the geometry (orientation, positions, spacing) is derived from the affine.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from idm3d.data.itk_io import _LPS_RAS, _one_line, _sitk
from idm3d.errors import DataError

__all__ = ["SeriesInfo", "dicom_files", "is_dicom_folder", "load_series", "read_series", "save_series"]

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_REQUIRED = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
# Slice steps may differ by this (mm, or this fraction of the step) before the spacing counts as uneven.
_STEP_ATOL_MM, _STEP_RTOL = 1e-2, 1e-2


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a folder (``.dcm`` names or a ``DICM`` preamble), sorted by name; not recursive."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _is_dicom_file(p))


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding at least one DICOM file."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any(p.is_file() and not p.name.startswith(".") and _is_dicom_file(p) for p in sorted(path.iterdir()))


class SeriesInfo:
    """The checked headers of a series: files in position order, shape (X, Y, Z) and RAS affine."""

    def __init__(self, folder: Path, files: list[Path], shape: tuple[int, int, int], affine: np.ndarray) -> None:
        self.folder, self.files, self.shape, self.affine = folder, files, shape, affine


def _header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as err:
        raise DataError(f"{path}: not a readable DICOM file ({_one_line(err)})") from None
    missing = [k for k in _REQUIRED if k not in ds]
    if missing:
        sop = str(getattr(ds, "SOPClassUID", "unknown"))
        name = getattr(getattr(ds, "SOPClassUID", None), "name", sop)
        raise DataError(f"{path}: not an image slice (SOP class {name}; lacks {', '.join(missing)})")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise DataError(f"{path}: a multi-frame DICOM object; give single-frame slices (one file per slice)")
    return ds


def read_series(folder: str | os.PathLike) -> SeriesInfo:
    """Check a series folder from its headers only and return its slices in order and its geometry.

    Raises:
        DataError: one line naming the folder or file (see the module docstring for every check).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM series folder not found")
    files = dicom_files(folder)
    if not files:
        raise DataError(f"{folder}: holds no DICOM files")
    headers = [(p, _header(p)) for p in files]
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} DICOM series (SeriesInstanceUID {', '.join(series[:3])}); "
                        "give one series per folder")
    if len(headers) < 2:
        raise DataError(f"{folder}: a DICOM series of {len(headers)} slice; a volume needs at least 2")
    first = headers[0][1]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    size = (int(first.Rows), int(first.Columns))
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
    for path, ds in headers[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise DataError(f"{path}: ImageOrientationPatient differs from {headers[0][0].name} (one orientation "
                            "per series)")
        if (int(ds.Rows), int(ds.Columns)) != size or not np.allclose(np.asarray(ds.PixelSpacing, float), spacing):
            raise DataError(f"{path}: rows/columns or PixelSpacing differ from {headers[0][0].name}")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-6 or np.any(spacing <= 0):
        raise DataError(f"{headers[0][0]}: ImageOrientationPatient or PixelSpacing is degenerate")
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    ordered = [headers[i][0] for i in order]
    steps = np.diff(along)
    if np.any(np.abs(steps) < _STEP_ATOL_MM):
        i = int(np.argmin(np.abs(steps)))
        raise DataError(f"{folder}: slices {ordered[i].name} and {ordered[i + 1].name} lie at the same position "
                        "(several acquisitions in one folder?)")
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > max(_STEP_ATOL_MM, _STEP_RTOL * step)
    if np.any(uneven):
        i = int(np.argmax(uneven))
        ratio = steps[i] / step
        if abs(ratio - round(ratio)) < _STEP_RTOL * 5 and round(ratio) >= 2:
            raise DataError(f"{folder}: {round(ratio) - 1} slice(s) missing between {ordered[i].name} and "
                            f"{ordered[i + 1].name} (gap {steps[i]:.3g} mm, step {step:.3g} mm)")
        raise DataError(f"{folder}: uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm); "
                        "idm3d reads evenly spaced series only")
    lps = np.eye(4)
    # PixelSpacing is (between rows, between columns); voxel index i runs along a row (column spacing).
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    affine = np.eye(4)
    affine[:3] = _LPS_RAS @ lps[:3]
    return SeriesInfo(folder, ordered, (size[1], size[0], len(ordered)), affine)


def load_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a checked series as float32 (X, Y, Z) values after rescale (HU for CT) and its RAS affine.

    Raises:
        DataError: any check of :func:`read_series`, or pixel data SimpleITK cannot decode.
    """
    info = read_series(folder)
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(p) for p in info.files])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{info.folder}: pixel data cannot be read ({_one_line(err)})") from None
    data = sitk.GetArrayViewFromImage(image).astype(np.float32).transpose(2, 1, 0)
    if data.shape != info.shape:
        raise DataError(f"{info.folder}: pixel data of shape {data.shape} does not match the headers {info.shape}")
    return data, info.affine  # Fortran-ordered (X, Y, Z), as nibabel returns NIfTI data


def _uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def _fmt(values: np.ndarray) -> list[str]:
    return [f"{float(v):.10g}" for v in values]


def save_series(
    folder: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *, description: str = "idm3d sample"
) -> Path:
    """Write a float (X, Y, Z) volume (HU) as a new CT series, one file per slice, into a new folder.

    The folder is written beside its destination and renamed into place, so a failure leaves nothing
    half-written. Values are rounded to integers (slope 1) when they fit int16, else stored with a slope.

    Returns:
        The folder.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder = Path(folder)
    array = np.asarray(data, dtype=np.float64)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise DataError(f"{folder}: can only write 3D volumes, got shape {array.shape}")
    if folder.exists():
        raise DataError(f"{folder}: already exists; a DICOM series is written into a new folder")
    lps = _LPS_RAS @ np.asarray(affine, dtype=np.float64)[:3]
    col_spacing, row_spacing = np.linalg.norm(lps[:, 0]), np.linalg.norm(lps[:, 1])
    row_dir, col_dir = lps[:, 0] / col_spacing, lps[:, 1] / row_spacing
    lo, hi = float(array.min()), float(array.max())
    slope = 1.0 if (lo >= -32768 and hi <= 32767) else max(abs(lo), abs(hi)) / 32767.0
    stored = np.clip(np.round(array / slope), -32768, 32767).astype(np.int16)
    now = datetime.datetime.now()
    study, series, frame = _uid(), _uid(), _uid()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        for k in range(array.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop = _uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = _CT_IMAGE_STORAGE, sop
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
            ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "CT", description, 1, k + 1
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.ImageOrientationPatient = _fmt(np.concatenate([row_dir, col_dir]))
            ds.ImagePositionPatient = _fmt(lps[:, 3] + k * lps[:, 2])
            ds.PixelSpacing = _fmt(np.array([row_spacing, col_spacing]))
            ds.SliceThickness = f"{float(np.linalg.norm(lps[:, 2])):.10g}"
            ds.Rows, ds.Columns = array.shape[1], array.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", "0", "HU"
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            pydicom.dcmwrite(tmp / f"slice_{k + 1:04d}.dcm", ds, enforce_file_format=True)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder
