"""The volumes a detector judges, read and preprocessed exactly as the run's training data was.

Every file - real or generated - goes through the data layer's one reader
(:func:`idm3d.data.readers.load_image`: NIfTI, NRRD, MetaImage or a DICOM-series folder, as for training and
sampling), float32, the run's preprocessing (orientation, spacing, crop with the run's foreground mask, its
intensity mode, padding; for a translation run the mask comes from the sources) and the same grid, so no file
format, dtype or scaling difference can act as a shortcut. Each fault is one line naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from idm3d.data.cases import AFFINE_ATOL_MM
from idm3d.data.dicom import is_dicom_folder
from idm3d.data.preprocess import preprocess_case
from idm3d.data.readers import image_format, is_volume_name, load_image, strip_volume_suffix
from idm3d.errors import ConfigError, DataError
from idm3d.inference.generate import parse_conditions
from idm3d.runs.data_source import naming_keys, preprocess_config
from idm3d.runs.load import LoadedRun

__all__ = ["KNOWN_MODALITIES", "DetectInput", "check_run", "read_inputs"]

# Modality names a file name may end in (``case_t1.nii.gz``); one of these that is not the run's target
# means the wrong file was passed.
KNOWN_MODALITIES = frozenset({"t1", "t1ce", "t1gd", "t2", "flair", "pd", "dwi", "adc", "ct", "pet", "seg"})
_SPACING_RTOL = 0.01


@dataclass
class DetectInput:
    """One volume on the run's grid: ``target`` (1, 1, X, Y, Z), ``condition`` (1, S, X, Y, Z) or None, ``mask``."""

    name: str
    target: Tensor
    condition: Tensor | None
    mask: Tensor


def check_run(run: LoadedRun) -> None:
    """Refuse runs the detector cannot use (several target modalities)."""
    if len(run.targets) != 1:
        raise ConfigError(f"--run {run.run_dir}: detection takes runs with one target modality, got {run.targets}")


def _modality_of(path: Path) -> str | None:
    stem = strip_volume_suffix(path.name).lower()
    return next((m for m in sorted(KNOWN_MODALITIES, key=len, reverse=True) if stem.endswith("_" + m)), None)


def _volume_named(folder: Path, stem: str) -> list[Path]:
    """The volumes of ``folder`` named ``stem`` + any volume suffix, or a DICOM folder named ``stem`` (any case)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if strip_volume_suffix(p.name).lower() == stem.lower()
                  and ((p.is_file() and is_volume_name(p.name)) or (p.is_dir() and is_dicom_folder(p))))


def _siblings(path: Path, target: str, sources: Sequence[str]) -> dict[str, Path]:
    """``case_t1.nii.gz`` next to ``case_t2.nii.gz``: the sources of a target named by the BraTS convention.

    A source may be in another format than its target (``case_ct`` a DICOM folder, ``case_ctc.nrrd`` beside it).
    """
    stem = strip_volume_suffix(path.name)
    suffix = path.name[len(stem):]
    if not stem.lower().endswith("_" + target):
        raise DataError(f"{path}: the run translates {list(sources)} -> {target}; give --condition, or name the "
                        f"file *_{target}{suffix} with its sources *_{sources[0]}{suffix} next to it")
    base = stem[: -len(target)]
    found: dict[str, Path] = {}
    for m in sources:
        matches = _volume_named(path.parent, base + m)
        if not matches:
            raise DataError(f"{path}: source volume {path.with_name(base + m + suffix)} not found; give --condition")
        if len(matches) > 1:
            raise DataError(f"{path}: several {m} volumes next to it ({', '.join(p.name for p in matches)}); "
                            "give --condition")
        found[m] = matches[0]
    return found


def _check_name(path: Path, target: str) -> None:
    image_format(path)  # the readers' one-line refusal: missing, not a volume, a folder without DICOM files
    named = _modality_of(path)
    if named is not None and named != target:
        raise DataError(f"{path}: named as a {named} volume; the run's target modality is {target}")


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _read_one(run: LoadedRun, path: Path, sources: Mapping[str, Path], grid_affine: np.ndarray | None) -> DetectInput:
    target = run.targets[0]
    data, affine = load_image(path)
    volumes = {}
    for modality, src in sources.items():
        src_data, src_affine = load_image(src)
        if src_data.shape != data.shape or not np.allclose(src_affine, affine, atol=AFFINE_ATOL_MM):
            raise DataError(f"{path}: grid (shape {data.shape}) differs from its source {src} (shape "
                            f"{src_data.shape}); a volume and its sources must be co-registered")
        volumes[modality] = src_data
    volumes[target] = data
    with naming_keys():
        record = preprocess_case(volumes, affine, preprocess_config(run.config), case_id=str(path))
    if grid_affine is not None and not np.allclose(_spacing(record.affine), _spacing(grid_affine), rtol=_SPACING_RTOL):
        raise DataError(f"{path}: voxel size {_spacing(record.affine).round(3).tolist()} mm, the run works at "
                        f"{_spacing(grid_affine).round(3).tolist()} mm (resample it, or train with data.spacing)")
    image = record.image[None].float()
    n_src = len(sources)
    return DetectInput(str(path), image[:, n_src:].contiguous(), image[:, :n_src].contiguous() if n_src else None,
                       record.mask[None].contiguous())


def read_inputs(
    run: LoadedRun,
    paths: Sequence[str | Path],
    conditions: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    *,
    option: str = "volumes",
) -> list[DetectInput]:
    """Read and preprocess ``paths`` (one target-modality volume each, in any format the data layer reads) for ``run``.

    Args:
        run: the loaded run whose denoiser judges the volumes.
        paths: the volumes: NIfTI, NRRD, MetaImage files or DICOM-series folders.
        conditions: translation runs: the sources as given to ``idm3d sample --condition`` (files in source
            order or ``MODALITY=FILE``), shared by every volume; ``None`` looks for ``<case>_<source>`` files
            next to each ``<case>_<target>`` file. Unconditional runs take none.
        option: the option named when ``paths`` is empty (``--real``, ``--fake``).

    Raises:
        ConfigError: an empty list, conditions for an unconditional run. DataError: a file that is missing,
            not a volume, named as another modality, not co-registered with its sources, or on another voxel size.
    """
    check_run(run)
    if not paths:
        raise ConfigError(f"{option}: expected at least one volume (NIfTI, NRRD, MetaImage or a DICOM series "
                          "folder), got none")
    sources = run.sources
    if not sources and conditions:
        raise ConfigError("--condition: this run generates unconditionally; it takes no condition")
    shared = parse_conditions(sources, conditions) if sources and conditions else None
    info = run.run.read_data_info() or {}
    cfg_spacing = run.config.data.spacing
    grid_affine = None if cfg_spacing is not None or "grid_affine" not in info else np.asarray(info["grid_affine"])
    out = []
    for p in paths:
        path = Path(p)
        _check_name(path, run.targets[0])
        if not sources:
            src: Mapping[str, Path] = {}
        else:
            src = shared if shared is not None else _siblings(path, run.targets[0], sources)
        out.append(_read_one(run, path, src, grid_affine))
    return out


def as_input(name: str, target: Tensor, condition: Tensor | None, mask: Tensor) -> DetectInput:
    """A :class:`DetectInput` from tensors already on the run's grid (``(1, X, Y, Z)`` or batched)."""
    def batched(t: Tensor | None) -> Tensor | None:
        return None if t is None else (t[None] if t.ndim == 4 else t).contiguous()

    return DetectInput(name, batched(target).float(), batched(condition), batched(mask).to(torch.bool))
