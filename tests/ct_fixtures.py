"""CT test data built here: an HU phantom written as a DICOM series (pydicom), NRRD, MHA and NIfTI.

The phantom is a 'body' in air: air -1000 HU outside, a fat layer (-100), soft tissue (40) and a bone
(1000) rod. Geometry is anisotropic with oblique direction cosines, as clinical CT can be.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

AIR, FAT, SOFT, BONE = -1000.0, -100.0, 40.0, 1000.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# An oblique plane (rotated ~10 degrees about z and ~5 about x), LPS, as (row direction, column direction).
_A, _B = np.deg2rad(10.0), np.deg2rad(5.0)
ROW_DIR = np.array([np.cos(_A), np.sin(_A), 0.0])
COL_DIR = np.array([-np.sin(_A) * np.cos(_B), np.cos(_A) * np.cos(_B), np.sin(_B)])
PIXEL_SPACING = (0.8, 0.7)  # (between rows, between columns) in mm
SLICE_STEP = 2.5
ORIGIN_LPS = np.array([-120.5, -95.25, 310.0])
# NRRD/MHA geometry (LPS, ITK order: x, y, z spacing and row-major direction matrix)
ITK_SPACING = (0.7, 0.8, 2.5)


def itk_direction() -> tuple[float, ...]:
    normal = np.cross(ROW_DIR, COL_DIR)
    return tuple(float(v) for v in np.stack([ROW_DIR, COL_DIR, normal], axis=1).ravel())


def ct_phantom(shape: Sequence[int] = (24, 20, 12), seed: int = 0) -> np.ndarray:
    """HU values (X, Y, Z): air around an elliptic body with fat, soft tissue and a bone rod; integers."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.7) ** 2)
    hu = np.full(shape, AIR)
    hu[r < 0.9] = FAT
    hu[r < 0.75] = SOFT
    hu[np.sqrt((x - 0.1) ** 2 + (y + 0.3) ** 2) < 0.2] = BONE
    noise = np.where(r < 0.9, rng.normal(0, 8.0, shape), 0.0)
    return np.round(hu + noise).astype(np.float32)


def _slice(k: int, pixels: np.ndarray, series: str, study: str, frame: str, *, slope: float, intercept: float,
           position: np.ndarray) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-12345", "19700101"
    ds.Modality, ds.InstanceNumber = "CT", k + 1
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in (*ROW_DIR, *COL_DIR)]
    ds.ImagePositionPatient = [f"{v:.10g}" for v in position]
    ds.PixelSpacing = [f"{v:.10g}" for v in PIXEL_SPACING]
    ds.SliceThickness = f"{SLICE_STEP:g}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_dicom_series(folder: Path, hu: np.ndarray, *, series_uid: str | None = None, skip: Sequence[int] = (),
                       shuffle_names: bool = True, step: float = SLICE_STEP,
                       steps: Sequence[float] | None = None) -> Path:
    """Write ``hu`` (X, Y, Z) as one CT slice per file (uint16, slope 1, intercept -1024), names not in order.

    ``skip`` leaves slices out (a missing slice); ``steps`` gives each gap (uneven spacing).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = series_uid or generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(ROW_DIR, COL_DIR)
    offsets = np.concatenate([[0.0], np.cumsum(steps)]) if steps is not None else np.arange(hu.shape[2]) * step
    n = hu.shape[2]
    for k in range(n):
        if k in skip:
            continue
        stored = np.round(hu[:, :, k].T + 1024.0)  # (rows = Y, columns = X)
        ds = _slice(k, stored, series, study, frame, slope=1.0, intercept=-1024.0,
                    position=ORIGIN_LPS + offsets[k] * normal)
        name = f"IM{(k * 7919) % 10007:05d}.dcm" if shuffle_names else f"IM{k:05d}.dcm"
        pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
    return folder


def dicom_affine(shape_z: int = 2) -> np.ndarray:
    """The RAS affine the fixture's DICOM series should be read with."""
    normal = np.cross(ROW_DIR, COL_DIR)
    lps = np.eye(4)
    lps[:3, 0] = ROW_DIR * PIXEL_SPACING[1]
    lps[:3, 1] = COL_DIR * PIXEL_SPACING[0]
    lps[:3, 2] = normal * SLICE_STEP
    lps[:3, 3] = ORIGIN_LPS
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_itk(path: Path, hu: np.ndarray) -> Path:
    """``hu`` (X, Y, Z) as NRRD or MHA (by suffix) with anisotropic spacing and oblique direction cosines."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16))
    image.SetSpacing(ITK_SPACING)
    image.SetOrigin(tuple(float(v) for v in ORIGIN_LPS))
    image.SetDirection(itk_direction())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), path.suffix != ".nhdr")
    return path


def write_nifti(path: Path, hu: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(np.float32), dicom_affine()), str(path))
    return path


def write_non_image_dicom(path: Path, series_uid: str) -> Path:
    """A DICOM file without pixels (a structured-report-like object) in the same series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = meta.MediaStorageSOPClassUID, sop, series_uid
    ds.Modality = "SR"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_ct_folder(root: Path, formats: Sequence[str] = ("dicom", "nrrd", "mha", "nifti"),
                    shape: Sequence[int] = (24, 20, 12)) -> Path:
    """``root/caseNN/`` holding ``caseNN_ct`` in each format in turn (a DICOM folder, .nrrd, .mha, .nii.gz)."""
    for i, fmt in enumerate(formats):
        case = root / f"case{i:02d}"
        hu = ct_phantom(shape, seed=i)
        if fmt == "dicom":
            write_dicom_series(case / f"case{i:02d}_ct", hu)
        elif fmt == "nifti":
            write_nifti(case / f"case{i:02d}_ct.nii.gz", hu)
        else:
            write_itk(case / f"case{i:02d}_ct.{fmt}", hu)
    return root


def tiny_ct_config(root: Path, **data) -> dict:
    """A 1-step ``data.intensity: ct`` run of a tiny IDM on 8^3 patches (``data`` adds or overrides keys)."""
    from helpers import TINY_IDM

    return {
        "data": {"root": str(root), "targets": ["ct"], "intensity": "ct", "patch_size": [8, 8, 8],
                 "test_fraction": 0.25, **data},
        "model": {"name": "idm", "kwargs": TINY_IDM}, "diffusion": {"num_train_timesteps": 20},
        "train": {"max_steps": 1, "checkpoint_every": 1, "log_every": 1, "progress": False,
                  "log": {"tensorboard": False}},
        "sample": {"steps": 2},
    }
