"""Finding cases on disk and checking them: BraTS2020 layout and generic folders of case sub-folders.

Both layouts are one folder per case holding one volume per modality: a NIfTI, NRRD (``.nrrd``/``.nhdr``)
or MetaImage (``.mha``/``.mhd``) file, or a sub-folder holding a DICOM series. A modality ``m`` is the
file (or DICOM folder) whose name without its suffix is ``m`` or ends in ``_m``, case-insensitively::

    root/BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz   # BraTS2020 (t1, t1ce, t2, flair, seg)
    root/subject_a/subject_a_t1.nii.gz                         # generic, suffix match
    root/subject_b/t2.nii                                      # generic, bare modality name
    root/patient_c/patient_c_ct.nrrd                           # NRRD, MetaImage likewise
    root/patient_d/patient_d_ct/IM0001.dcm ...                 # a DICOM series folder
    root/patient_e/IM0001.dcm ...                              # a case folder that is one DICOM series:
                                                               # the case's only modality (one requested)

``t1`` never matches ``..._t1ce.nii.gz``. A root holding volume files and no sub-folders is one case.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from idm3d.data.dicom import is_dicom_folder
from idm3d.data.readers import is_volume_name, read_image_header, strip_volume_suffix
from idm3d.data.readers import load_image as load_volume
from idm3d.errors import ArgumentError, DataError

__all__ = [
    "BRATS_MODALITIES",
    "LABEL_MODALITIES",
    "CaseFiles",
    "Problem",
    "check_case",
    "check_dataset",
    "detect_layout",
    "find_cases",
    "load_case",
    "parse_modalities",
    "scan_cases",
]

BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair", "seg")
# Label maps may legitimately be constant (no lesion), intensity images may not.
LABEL_MODALITIES = frozenset({"seg", "label", "labels", "mask"})
_BRATS_CASE = re.compile(r"^BraTS20_(Training|Validation)_\d{3}$")
# Affines of co-registered modalities agree to float32 rounding; 1e-3 mm is far below any voxel size.
AFFINE_ATOL_MM = 1e-3


class Problem(str):
    """One problem of a data folder, as a record: ``file`` (the file or folder at fault) and ``detail``.

    It is also the line ``idm3d data check`` prints (``"<file>: <detail>"``), so lists of problems sort,
    join and print as strings; code that needs the file or the fault reads the fields, never the text.
    """

    file: Path
    detail: str

    def __new__(cls, file: str | os.PathLike, detail: str, *, line: str | None = None) -> Problem:
        self = super().__new__(cls, f"{file}: {detail}" if line is None else line)
        self.file, self.detail = Path(file), detail
        return self

    @classmethod
    def from_error(cls, file: str | os.PathLike, err: DataError) -> Problem:
        """The problem of ``file`` that a reader's DataError reports (its message names the file already)."""
        return cls(file, str(err), line=str(err))

    def __reduce__(self) -> tuple[Any, tuple[Path, str, str]]:
        return _problem, (self.file, self.detail, str(self))


def _problem(file: Path, detail: str, line: str) -> Problem:
    return Problem(file, detail, line=line)


@dataclass(frozen=True)
class CaseFiles:
    """One case: its id (folder name) and one file per requested modality, in the requested order."""

    case_id: str
    folder: Path
    files: dict[str, Path]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.files)


def parse_modalities(value: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``"t1,t2"`` or ``["T1", "t2"]`` to ``("t1", "t2")``.

    Raises:
        ValueError: empty list, empty name, name with a path separator, or a repeated modality.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(m).strip().lower() for m in items)
    if not names or any(not m or "/" in m or os.sep in m for m in names):
        raise ArgumentError("modalities", f"expected comma-separated names such as 't1,t2', got {value!r}")
    if len(set(names)) != len(names):
        raise ArgumentError("modalities", f"each modality may appear once, got {value!r}")
    return names


def _matches(filename: str, modality: str) -> bool:
    stem = strip_volume_suffix(filename).lower()
    return stem == modality or stem.endswith("_" + modality)


def _nifti_files(folder: Path) -> list[Path]:
    """The volumes of a folder: NIfTI/NRRD/MetaImage files and DICOM-series sub-folders (name kept for history)."""
    entries = (p for p in folder.iterdir() if not p.name.startswith("."))
    return sorted(p for p in entries if (p.is_file() and is_volume_name(p.name)) or (p.is_dir() and is_dicom_folder(p)))


def _case_from_folder(folder: Path, modalities: Sequence[str], problems: list[Problem]) -> CaseFiles | None:
    niftis = _nifti_files(folder)
    if not niftis and len(modalities) == 1 and is_dicom_folder(folder):
        return CaseFiles(folder.name, folder, {modalities[0]: folder})  # the case folder is one DICOM series
    if not niftis:
        problems.append(Problem(folder, "case folder holds no .nii/.nii.gz files (nor .nrrd/.mha or DICOM series)"))
        return None
    files: dict[str, Path] = {}
    for modality in modalities:
        found = [p for p in niftis if _matches(p.name, modality)]
        if not found:
            problems.append(Problem(
                folder, f"case {folder.name} has no {modality} file "
                f"(expected a name ending in _{modality}.nii.gz or _{modality}.nii; or .nrrd, .mha, "
                f"or a DICOM series folder named ..._{modality})"
            ))
        elif len(found) > 1:
            names = ", ".join(p.name for p in found)
            problems.append(Problem(folder, f"case {folder.name} has several {modality} files ({names})"))
        else:
            files[modality] = found[0]
    return CaseFiles(folder.name, folder, files) if len(files) == len(modalities) else None


def scan_cases(root: str | os.PathLike, modalities: Iterable[str] | str) -> tuple[list[CaseFiles], list[Problem]]:
    """Find the cases under ``root`` by file names only (no file is opened).

    Returns:
        ``(cases, problems)``: complete cases sorted by id, and one :class:`Problem` per problem found
        (its ``file`` a case folder, or ``root`` itself).
    """
    root = Path(root)
    mods = parse_modalities(modalities)
    if not root.exists():
        return [], [Problem(root, "data folder not found")]
    if not root.is_dir():
        return [], [Problem(root, "not a folder (expected a folder of case sub-folders)")]
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems: list[Problem] = []
    if not subdirs:
        if not _nifti_files(root) and not is_dicom_folder(root):
            return [], [Problem(root, "data folder is empty (no case sub-folders and no .nii/.nii.gz files)")]
        case = _case_from_folder(root, mods, problems)
        return ([case] if case else []), problems
    if not any(_nifti_files(d) or is_dicom_folder(d) for d in subdirs):
        hint = f"; did you mean {subdirs[0]}?" if len(subdirs) == 1 else ""
        return [], [Problem(root, f"no sub-folder holds .nii/.nii.gz files{hint}")]
    cases = [c for d in subdirs if (c := _case_from_folder(d, mods, problems)) is not None]
    return cases, problems


def find_cases(root: str | os.PathLike, modalities: Iterable[str] | str) -> list[CaseFiles]:
    """Cases under ``root`` that have every requested modality.

    Raises:
        DataError: folder missing or empty, or any case lacks a modality or has it twice (the message
            gives the first problem and how many more ``idm3d data check`` would list).
    """
    cases, problems = scan_cases(root, modalities)
    if problems:
        more = f" (and {len(problems) - 1} more; run `idm3d data check {root}`)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return cases


def detect_layout(cases: Sequence[CaseFiles]) -> str:
    """``"brats2020"`` when every case folder and file follows BraTS2020 naming, else ``"generic"``."""
    if cases and all(
        _BRATS_CASE.match(c.case_id)
        and all(strip_volume_suffix(p.name).lower() == f"{c.case_id}_{m}".lower() for m, p in c.files.items())
        for c in cases
    ):
        return "brats2020"
    return "generic"


def _geometry_problems(geometry: dict[str, tuple[Path, tuple[int, ...], np.ndarray]]) -> list[Problem]:
    items = list(geometry.values())
    if not items:
        return []
    ref_path, ref_shape, ref_affine = items[0]
    problems = []
    for path, shape, affine in items[1:]:
        if shape != ref_shape:
            problems.append(Problem(
                path, f"shape {shape} differs from {ref_path} shape {ref_shape} "
                "(modalities of a case must share one voxel grid)"
            ))
        elif not np.allclose(affine, ref_affine, rtol=0.0, atol=AFFINE_ATOL_MM):
            diff = float(np.abs(affine - ref_affine).max())
            problems.append(Problem(
                path, f"affine differs from {ref_path} by up to {diff:.4g} mm "
                "(modalities of a case must be co-registered on one voxel grid)"
            ))
    return problems


def check_case(case: CaseFiles, *, deep: bool = True) -> list[Problem]:
    """Problems of one case: unreadable files, bad voxels (``deep``), shape/affine mismatch.

    Args:
        case: the case's files.
        deep: read every voxel (detects truncation, NaN/Inf, constant volumes); otherwise headers only.
    """
    problems: list[Problem] = []
    geometry: dict[str, tuple[Path, tuple[int, ...], np.ndarray]] = {}
    for modality, path in case.files.items():
        try:
            if deep:
                data, affine = load_volume(path, allow_constant=modality in LABEL_MODALITIES)
                geometry[modality] = (path, tuple(data.shape), affine)
            else:
                header = read_image_header(path)
                geometry[modality] = (path, header.shape, header.affine)
        except DataError as err:
            problems.append(Problem.from_error(path, err))
    return problems + _geometry_problems(geometry)


def check_dataset(
    root: str | os.PathLike, modalities: Iterable[str] | str = ("t1", "t2"), *, deep: bool = True
) -> list[Problem]:
    """Every problem of a dataset folder (:class:`Problem`: one line each naming the file or folder), sorted;
    empty when clean.

    Covers: folder missing/empty, missing or duplicated modality files, files that are not NIfTI,
    corrupt or truncated, not 3D, with NaN/Inf voxels or constant (``deep`` only for the voxel checks),
    and modalities of one case whose shapes or affines differ.
    """
    cases, problems = scan_cases(root, modalities)
    for case in cases:
        problems.extend(check_case(case, deep=deep))
    # Every line starts with its file or case folder: sorting groups the lines case by case.
    return sorted(problems)


def load_case(case: CaseFiles) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read every modality of a case and check they share one grid.

    Returns:
        ``(volumes, affine)``: float32 arrays (X, Y, Z) by modality, and their common affine.

    Raises:
        DataError: the first fault of any file, or a shape/affine mismatch naming both files.
    """
    volumes: dict[str, np.ndarray] = {}
    geometry: dict[str, tuple[Path, tuple[int, ...], np.ndarray]] = {}
    for modality, path in case.files.items():
        data, affine = load_volume(path, allow_constant=modality in LABEL_MODALITIES)
        volumes[modality] = data
        geometry[modality] = (path, tuple(data.shape), affine)
    mismatch = _geometry_problems(geometry)
    if mismatch:
        raise DataError(mismatch[0])
    return volumes, next(iter(geometry.values()))[2]
