"""One reader and writer for the volumes users have: NIfTI, NRRD, MetaImage and DICOM-series folders.

=====================  ===================================  ======================================
input                  read by                              geometry
=====================  ===================================  ======================================
``.nii``/``.nii.gz``   :mod:`idm3d.data.nifti` (nibabel)    the file's affine
``.nrrd``/``.nhdr``    :mod:`idm3d.data.itk_io` (SimpleITK)  space origin/directions (LPS -> RAS)
``.mha``/``.mhd``      :mod:`idm3d.data.itk_io` (SimpleITK)  Offset/TransformMatrix (LPS -> RAS)
a folder of DICOM      :mod:`idm3d.data.dicom` (pydicom     positions/orientation/pixel spacing
                       checks, SimpleITK pixels)
=====================  ===================================  ======================================

Every reader returns ``(float32 (X, Y, Z) array, 4x4 RAS voxel-to-world affine)`` and raises one
:class:`~idm3d.errors.DataError` line naming the file or folder; NaN/Inf and constant volumes are refused
as for NIfTI. :func:`save_image` writes in the format its name says (a name without a volume suffix is a
DICOM series folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from idm3d.data.dicom import is_dicom_folder, load_series, read_series, save_series
from idm3d.data.itk_io import ITK_SUFFIXES, load_itk, read_itk_header, save_itk
from idm3d.data.nifti import NIFTI_SUFFIXES, VolumeHeader, load_volume, read_header, save_volume, validate_volume
from idm3d.errors import DataError

__all__ = [
    "VOLUME_SUFFIXES",
    "image_format",
    "is_volume_name",
    "load_image",
    "read_image_header",
    "save_image",
    "strip_volume_suffix",
    "volume_suffix",
]

VOLUME_SUFFIXES: tuple[str, ...] = (*NIFTI_SUFFIXES, *ITK_SUFFIXES)


def volume_suffix(name: str | os.PathLike) -> str | None:
    """The volume suffix of a file name (``".nii.gz"``, ``".nrrd"`` ..., lower case), or None."""
    low = str(name).lower()
    return next((s for s in VOLUME_SUFFIXES if low.endswith(s)), None)


def is_volume_name(name: str | os.PathLike) -> bool:
    """True for a NIfTI, NRRD or MetaImage file name (any case)."""
    return volume_suffix(name) is not None


def strip_volume_suffix(name: str) -> str:
    """``"case_ct.nrrd"`` -> ``"case_ct"``; other names (a DICOM folder's) are returned unchanged."""
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def image_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"nrrd"``, ``"metaimage"`` or ``"dicom"`` (an existing folder of DICOM files).

    Raises:
        DataError: neither a volume file name nor a DICOM folder.
    """
    path = Path(path)
    suffix = volume_suffix(path.name)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in (".nrrd", ".nhdr"):
        return "nrrd"
    if suffix in (".mha", ".mhd"):
        return "metaimage"
    if path.is_dir():
        if is_dicom_folder(path):
            return "dicom"
        raise DataError(f"{path}: folder holds no DICOM files (expected a DICOM series folder)")
    if not path.exists():
        raise DataError(f"{path}: file not found")
    raise DataError(f"{path}: not a volume (expected .nii(.gz), .nrrd, .nhdr, .mha, .mhd or a DICOM series folder)")


def load_image(path: str | os.PathLike, *, allow_constant: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole 3D volume in any supported format (NIfTI goes through :func:`~idm3d.data.nifti.load_volume`).

    Args:
        path: a volume file or a DICOM series folder.
        allow_constant: accept constant volumes (label maps).

    Returns:
        ``(data, affine)``: float32 (X, Y, Z) array and its 4x4 RAS voxel-to-world affine.

    Raises:
        DataError: one line naming the file or folder.
    """
    path = Path(path)
    kind = image_format(path)
    if kind == "nifti":
        return load_volume(path, allow_constant=allow_constant)
    data, affine = load_series(path) if kind == "dicom" else load_itk(path)
    validate_volume(data, path, allow_constant=allow_constant)
    return data, affine


def read_image_header(path: str | os.PathLike) -> VolumeHeader:
    """Shape and affine without reading voxels (a DICOM folder: every header, no pixels).

    Raises:
        DataError: one line naming the file or folder.
    """
    path = Path(path)
    kind = image_format(path)
    if kind == "nifti":
        return read_header(path)
    if kind == "dicom":
        info = read_series(path)
        shape, affine = info.shape, info.affine
    else:
        shape, affine = read_itk_header(path)
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    return VolumeHeader(path=path, shape=shape, affine=affine, zooms=zooms)


def save_image(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3D volume in the format of ``path``'s name; a name without a volume suffix is a DICOM series folder.

    Returns:
        The written file or folder.
    """
    path = Path(path)
    suffix = volume_suffix(path.name)
    if suffix in NIFTI_SUFFIXES:
        return save_volume(path, data, affine)
    if suffix in ITK_SUFFIXES:
        return save_itk(path, data, affine)
    if path.suffix and path.suffix.lower() != ".dcm":
        raise DataError(f"{path}: unknown output format (expected .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, or a "
                        "folder name for a DICOM series)")
    return save_series(path, data, affine)
