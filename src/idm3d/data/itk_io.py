"""NRRD (``.nrrd``/``.nhdr``) and MetaImage (``.mha``/``.mhd``) through SimpleITK, with RAS affines.

SimpleITK works in LPS world coordinates with (z, y, x) arrays; the rest of idm3d (nibabel, MONAI) uses a
RAS voxel-to-world affine for an (X, Y, Z) array. The conversion is exact:
``affine[:3, :3] = diag(-1, -1, 1) @ direction @ diag(spacing)`` and ``affine[:3, 3] = diag(-1, -1, 1) @ origin``.
Every fault becomes one :class:`~idm3d.errors.DataError` line naming the file; a volume is returned only
once it was read whole.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from idm3d.data.nifti import volume_to_write
from idm3d.errors import DataError

__all__ = ["ITK_SUFFIXES", "affine_from_itk", "itk_from_affine", "load_itk", "read_itk_header", "save_itk"]

ITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
_FORMAT = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}


def _sitk():
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    return sitk


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK's messages start with a source location; the reason is the last informative line.
    text = next((ln for ln in reversed(lines) if not ln.startswith(("sitk::ERROR", "itk::ERROR")) or ":" in ln), "")
    text = text.split("): ", 1)[-1] if "): " in text else text
    return " ".join(text.split())[:300] or type(err).__name__


def _format(path: Path) -> str:
    return _FORMAT.get(path.suffix.lower(), "NRRD/MetaImage")


def affine_from_itk(origin: tuple[float, ...], spacing: tuple[float, ...], direction: tuple[float, ...]) -> np.ndarray:
    """The 4x4 RAS voxel-to-world affine of an ITK image's LPS origin, spacing and direction cosines."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_RAS @ d @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = _LPS_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def itk_from_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(origin, spacing, direction)`` in ITK's LPS convention for a RAS affine (see :func:`affine_from_itk`)."""
    affine = np.asarray(affine, dtype=np.float64)
    lps = _LPS_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    return tuple(map(float, _LPS_RAS @ affine[:3, 3])), tuple(map(float, spacing)), tuple(map(float, direction.ravel()))


def _check_path(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    if path.suffix.lower() not in ITK_SUFFIXES:
        raise DataError(f"{path}: not a NRRD or MetaImage file (expected .nrrd, .nhdr, .mha or .mhd)")


def _geometry(reader_or_image, path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    size = list(reader_or_image.GetSize())
    dim = len(size)
    while len(size) > 3 and size[-1] == 1:
        size.pop()
    if len(size) != 3 or min(size) < 2:
        raise DataError(f"{path}: expected a 3D volume, got {dim}D data of size {tuple(reader_or_image.GetSize())}")
    if dim != 3:
        raise DataError(f"{path}: expected a 3D volume, got {dim}D data (store it as a 3D image)")
    components = reader_or_image.GetNumberOfComponents() if hasattr(reader_or_image, "GetNumberOfComponents") else (
        reader_or_image.GetNumberOfComponentsPerPixel())
    if components != 1:
        raise DataError(f"{path}: expected one value per voxel, got {components} components (a vector image)")
    affine = affine_from_itk(reader_or_image.GetOrigin(), reader_or_image.GetSpacing(), reader_or_image.GetDirection())
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: voxel-to-world geometry (spacing, direction) is singular or not finite")
    return (size[0], size[1], size[2]), affine


def read_itk_header(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape (X, Y, Z), RAS affine)`` from the header only (fast; does not read the voxels).

    Raises:
        DataError: missing file, wrong suffix, unreadable header, not a 3D scalar volume, singular geometry.
    """
    path = Path(path)
    _check_path(path)
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(f"{path}: not a readable {_format(path)} file ({_one_line(err)})") from None
    return _geometry(reader, path)


def load_itk(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole NRRD or MetaImage volume.

    Returns:
        ``(data, affine)``: float32 (X, Y, Z) array and its RAS voxel-to-world affine.

    Raises:
        DataError: one line naming the file (missing, unreadable or truncated, not 3D, vector image,
            singular geometry).
    """
    path = Path(path)
    _check_path(path)
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise DataError(f"{path}: corrupt, truncated or unreadable {_format(path)} file ({_one_line(err)})") from None
    except MemoryError:
        raise DataError(f"{path}: header asks for more memory than there is (corrupt header?)") from None
    _, affine = _geometry(image, path)
    # A transposed view of the (z, y, x) copy: (X, Y, Z) in Fortran order, as nibabel returns NIfTI data.
    return sitk.GetArrayViewFromImage(image).astype(np.float32).transpose(2, 1, 0), affine


def save_itk(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *, compress: bool = True) -> Path:
    """Write a float32 (X, Y, Z) volume as NRRD or MetaImage with the geometry of ``affine``, atomically.

    ``.nhdr``/``.mhd`` write a header and a separate data file beside it (not atomic as a pair).
    """
    path = Path(path)
    if path.suffix.lower() not in ITK_SUFFIXES:
        raise DataError(f"{path}: output name must end in .nrrd, .nhdr, .mha or .mhd")
    array = volume_to_write(data, path)
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    origin, spacing, direction = itk_from_affine(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".nhdr", ".mhd"):
        sitk.WriteImage(image, str(path), compress)
        return path
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, compress)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
