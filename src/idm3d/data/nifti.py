"""Reading and writing NIfTI volumes safely: every fault becomes one-line :class:`~idm3d.errors.DataError`.

The whole file is read and (for ``.nii.gz``) decompressed eagerly, so a truncated or bit-flipped archive
fails here (gzip CRC/length check) instead of producing garbage later in training.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from idm3d.errors import DataError

__all__ = [
    "NIFTI_SUFFIXES",
    "VolumeHeader",
    "is_nifti_name",
    "load_volume",
    "read_header",
    "save_volume",
    "strip_nifti_suffix",
    "validate_volume",
    "volume_to_write",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
_GZIP_MAGIC = b"\x1f\x8b"
# sizeof_hdr (first int32 of the header) tells NIfTI-1 (348) from NIfTI-2 (540), in either byte order.
_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}
# Errors that nibabel, gzip and zlib raise on damaged input; all become DataError.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError, TypeError)


@dataclass(frozen=True)
class VolumeHeader:
    """Geometry of a volume read from its header only (no voxel data)."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    zooms: tuple[float, ...]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def is_nifti_name(path: str | os.PathLike) -> bool:
    """True when the file name ends with ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``"case_t1.nii.gz"`` -> ``"case_t1"``; names without a NIfTI suffix are returned unchanged."""
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    if not is_nifti_name(path):
        raise DataError(f"{path}: not a NIfTI file (expected a name ending in .nii or .nii.gz)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({_one_line(err.strerror or err)})") from err
    if raw[:2] == _GZIP_MAGIC:
        try:
            # Full decompression checks the gzip CRC and length: truncation or corruption shows up now.
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt or truncated gzip data ({_one_line(err)})") from err
    elif str(path).lower().endswith(".gz"):
        raise DataError(f"{path}: not a gzip file although the name ends in .gz (not a NIfTI file)")
    return raw


def _image_from_bytes(raw: bytes, path: Path) -> nib.Nifti1Image:
    if len(raw) < 348:
        raise DataError(f"{path}: not a NIfTI file (only {len(raw)} bytes, a NIfTI header needs 348)")
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    klass = next((_HEADER_SIZES[s] for s in sizes if s in _HEADER_SIZES), None)
    if klass is None:
        raise DataError(f"{path}: not a NIfTI file (header size field is not 348 or 540)")
    try:
        image = klass.from_bytes(raw)
    except _READ_ERRORS as err:
        raise DataError(f"{path}: unreadable NIfTI header ({_one_line(err)})") from err
    header = image.header
    offset = int(header.get_data_offset()) or (352 if klass is nib.Nifti1Image else 544)
    needed = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    # Check before reading: a lying header would otherwise make nibabel allocate a huge buffer.
    if needed > len(raw):
        raise DataError(
            f"{path}: truncated NIfTI data (header shape {tuple(header.get_data_shape())} needs {needed} bytes, "
            f"file holds {len(raw)})"
        )
    return image


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:  # (X, Y, Z, 1) is a 3D volume stored as 4D
        dims.pop()
    if len(dims) > 3:
        raise DataError(f"{path}: expected a 3D volume, got {len(dims)}D data of shape {tuple(shape)}")
    if len(dims) < 3 or min(dims) < 2:
        raise DataError(f"{path}: expected a 3D volume, got 2D data of shape {tuple(shape)}")
    return tuple(dims)


def _check_affine(affine: np.ndarray, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: voxel-to-world affine is singular or not finite")
    return affine


def validate_volume(data: np.ndarray, path: str | os.PathLike, *, allow_constant: bool = False) -> None:
    """Raise :class:`DataError` naming ``path`` when ``data`` has NaN/Inf voxels or is constant.

    Args:
        data: voxel array.
        path: file name used in the message.
        allow_constant: accept a constant volume (an empty label map is legitimate).
    """
    n_nan = int(np.isnan(data).sum())
    n_inf = int(np.isinf(data).sum())
    if n_nan or n_inf:
        raise DataError(f"{path}: contains non-finite voxels ({n_nan} NaN, {n_inf} Inf of {data.size})")
    if not allow_constant and data.size and float(data.max()) == float(data.min()):
        raise DataError(f"{path}: volume is constant (every voxel is {float(data.min()):g}), e.g. an empty image")


def load_volume(path: str | os.PathLike, *, allow_constant: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume with every check this project relies on.

    Intensities come from ``get_fdata`` so integer storage with ``scl_slope``/``scl_inter`` is honoured.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        allow_constant: accept constant volumes (label maps); intensity images must vary.

    Returns:
        ``(data, affine)``: float32 array of shape (X, Y, Z) in voxel order and the 4x4 voxel-to-world affine.

    Raises:
        DataError: one line naming the file and the fault (missing, not NIfTI, corrupt or truncated,
            not 3D, NaN/Inf voxels, constant volume, singular affine).
    """
    path = Path(path)
    image = _image_from_bytes(_read_bytes(path), path)
    shape = _spatial_shape(tuple(image.shape), path)
    try:
        data = image.get_fdata(dtype=np.float32)
    except (*_READ_ERRORS, MemoryError) as err:
        raise DataError(f"{path}: voxel data cannot be read ({_one_line(err)})") from err
    while data.ndim > len(shape):  # drop trailing singleton dims without copying (nibabel data is F-ordered)
        data = data[..., 0]
    validate_volume(data, path, allow_constant=allow_constant)
    return data, _check_affine(image.affine, path)


def read_header(path: str | os.PathLike) -> VolumeHeader:
    """Geometry of a 3D NIfTI file from its header only (fast; does not detect corrupt voxel data).

    Raises:
        DataError: missing file, not a NIfTI, unreadable header, not 3D, singular affine.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not is_nifti_name(path):
        raise DataError(f"{path}: not a NIfTI file (expected a name ending in .nii or .nii.gz)")
    try:
        image = nib.load(path)
        shape = tuple(int(s) for s in image.shape)
        affine = image.affine
        zooms = tuple(float(z) for z in image.header.get_zooms())
    except (*_READ_ERRORS, AttributeError) as err:
        raise DataError(f"{path}: not a readable NIfTI file ({_one_line(err)})") from err
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise DataError(f"{path}: not a NIfTI file (nibabel reads it as {type(image).__name__})")
    spatial = _spatial_shape(shape, path)
    return VolumeHeader(path=path, shape=spatial, affine=_check_affine(affine, path), zooms=zooms[:3])


def volume_to_write(data: Any, path: Path) -> np.ndarray:
    """``data`` as a float32 3D array for a writer: one leading channel dropped, anything else not 3D refused."""
    array = np.asarray(data, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise DataError(f"{path}: can only write 3D volumes, got shape {array.shape}")
    return array


def save_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a float32 NIfTI volume atomically (temporary file then rename).

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz``.
        data: array of shape (X, Y, Z) (a leading singleton channel is dropped).
        affine: 4x4 voxel-to-world affine of ``data``.

    Returns:
        The written path.
    """
    path = Path(path)
    if not is_nifti_name(path):
        raise DataError(f"{path}: output name must end in .nii or .nii.gz")
    array = volume_to_write(data, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
