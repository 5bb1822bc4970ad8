"""Sampling from a trained run: unconditional volumes, or a target modality translated from sources.

The output NIfTI lies where the input does: a translation is put back on the condition's original grid
(orientation, crop and padding undone) and written with the condition's affine; an unconditional sample
uses the training data's working grid and affine. Intensities are mapped from [-1, 1] back to the
typical range of the training cases' target modality (median of their percentile scalings), since a
synthesised target has no reference scan of its own.

The model, its settings and the chain come from :func:`idm3d.runs.load.load_run`; this module only
reads the inputs and writes the outputs. Inputs may be NIfTI, NRRD, MetaImage or DICOM-series folders
(:mod:`idm3d.data.readers`); the output's format follows ``out``'s name (``.nii.gz``, ``.nii``, ``.nrrd``,
``.nhdr``, ``.mha``, ``.mhd``; for a ``data.intensity: ct`` run, a name without suffix is a new DICOM series
folder, :func:`idm3d.data.dicom.save_series`). A CT run's outputs are in Hounsfield units (its window).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idm3d.data.preprocess import CaseRecord, IntensityScaling, preprocess_case
from idm3d.data.readers import load_image as load_volume
from idm3d.data.readers import save_image as save_volume
from idm3d.errors import ConfigError, DataError
from idm3d.inference.figures import save_mid_slices
from idm3d.runs.config import Config
from idm3d.runs.data_source import naming_keys, preprocess_config
from idm3d.runs.load import BACKGROUND, LoadedRun, load_run, mask_background, sample_settings
from idm3d.runs.model_factory import size_multiple

__all__ = [
    "BACKGROUND", "mask_background", "output_paths", "parse_conditions", "sample", "sample_settings", "sample_to_file",
    "write_sample",
]

_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", re.IGNORECASE)


def parse_conditions(sources: Sequence[str], conditions: Sequence[str | Path] | Mapping[str, str | Path]) -> dict:
    """Map each source modality to a file: ``{"t1": path}``, ``["t1=path"]`` or paths in source order."""
    if isinstance(conditions, Mapping):
        found = {str(k).lower(): Path(v) for k, v in conditions.items()}
    else:
        items = [str(c) for c in conditions]
        named = [c for c in items if "=" in c and not Path(c).exists()]
        if named and len(named) != len(items):
            raise ConfigError("--condition: give all conditions as MODALITY=FILE or all as plain files")
        if named:
            found = {k.strip().lower(): Path(v) for k, v in (c.split("=", 1) for c in named)}
        else:
            if len(items) != len(sources):
                raise ConfigError(
                    f"--condition: the model translates {list(sources)}; give {len(sources)} file(s) in that "
                    f"order, got {len(items)}"
                )
            found = dict(zip(sources, map(Path, items)))
    if set(found) != set(sources):
        raise ConfigError(f"--condition: expected files for {list(sources)}, got {sorted(found)}")
    return {m: found[m] for m in sources}


def output_paths(out: str | Path, targets: Sequence[str], *, dicom: bool = False) -> tuple[list[Path], Path]:
    """Volume path per target (``out``, or ``out`` with ``_<target>`` when several) and the PNG path.

    ``dicom``: a name without a suffix is accepted (a DICOM series folder; CT runs).
    """
    out = Path(out)
    if not _SUFFIX.search(out.name) and not (dicom and not out.suffix):
        more = "; or a folder name without suffix for a DICOM series" if dicom else ""
        raise ConfigError(f"--out {out}: expected a name ending in .nii.gz or .nii (or .nrrd, .nhdr, .mha, .mhd"
                          f"{more})")
    match = _SUFFIX.search(out.name)
    stem, suffix = (_SUFFIX.sub("", out.name), match.group(1)) if match else (out.name, "")
    paths = [out] if len(targets) == 1 else [out.with_name(f"{stem}_{t}{suffix}") for t in targets]
    return paths, out.with_name(f"{stem}.png")


def _load_condition(files: Mapping[str, Path], cfg: Config) -> CaseRecord:
    volumes, ref = {}, None
    for modality, path in files.items():
        data, affine = load_volume(path)
        if ref is None:
            ref = (path, data.shape, affine)
        elif data.shape != ref[1] or not np.allclose(affine, ref[2], atol=1e-3):
            raise DataError(f"{path}: grid (shape {data.shape}) differs from {ref[0]} (shape {ref[1]}); "
                            "condition volumes must be co-registered")
        volumes[modality] = data
    with naming_keys():
        return preprocess_case(volumes, ref[2], preprocess_config(cfg), case_id=ref[0].name)


def _scaling(info: Mapping | None, modality: str) -> IntensityScaling | None:
    if not info or modality not in info.get("scalings", {}):
        return None
    s = info["scalings"][modality]
    return IntensityScaling(float(s["lo"]), float(s["hi"]))


def sample_to_file(
    run_dir: str | Path | LoadedRun,
    out: str | Path,
    conditions: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int | None = None,
    use_ema: bool | None = None,
    checkpoint: str | Path | None = None,
    shape: Sequence[int] | None = None,
    device: str = "auto",
    progress: bool = True,
    precision: str | None = None,
) -> list[Path]:
    """Generate (or translate) one volume with a trained run and write it as NIfTI + a mid-slice PNG.

    Args:
        run_dir: the run folder, or a run already loaded by :func:`~idm3d.runs.load.load_run` (then
            ``sampler`` ... ``precision`` must be left unset: they were chosen when loading it).
        out: output ``.nii.gz``; with several target modalities ``_<modality>`` is added per file.
        conditions: translation only: one NIfTI per source modality.
        sampler: ``ddpm`` or ``ddim`` (default: the run's ``sample.sampler``).
        steps: sampling steps (default: ``sample.steps``).
        eta: DDIM stochasticity (default: ``sample.eta``).
        seed: RNG seed of the chain (default: ``sample.seed``).
        use_ema: EMA weights or the raw ones (default: the run's ``sample.use_ema``, normally EMA).
        checkpoint: a specific checkpoint (default: the newest).
        shape: unconditional only: (X, Y, Z) grid (default: the training data's working grid).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        progress: show a progress bar.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the denoiser (default: the run's
            ``sample.precision``); the chain itself stays in float32.

    Returns:
        The written NIfTI files, then the PNG.
    """
    settings = {"sampler": sampler, "steps": steps, "eta": eta, "seed": seed, "precision": precision,
                "use_ema": use_ema, "checkpoint": checkpoint}
    if isinstance(run_dir, LoadedRun):
        given = [k for k, v in settings.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]}: set when loading the run (load_run), not when sampling a loaded one")
        run = run_dir
    else:
        run = load_run(run_dir, device=device, **settings)
    return write_sample(run, out, conditions, shape=shape, progress=progress)


_SAMPLE_WARNED = False


def sample(*args: Any, **kwargs: Any) -> list[Path]:
    """Deprecated name of :func:`sample_to_file` (warns once, then calls it)."""
    global _SAMPLE_WARNED
    if not _SAMPLE_WARNED:
        _SAMPLE_WARNED = True
        warnings.warn("idm3d.sample is deprecated; use idm3d.sample_to_file (it reads condition files and writes "
                      "NIfTI/PNG; DiffusionPipeline.sample samples tensors)", DeprecationWarning, stacklevel=2)
    return sample_to_file(*args, **kwargs)


def write_sample(
    run: LoadedRun,
    out: str | Path,
    conditions: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    *,
    shape: Sequence[int] | None = None,
    seed: int | None = None,
    progress: bool = False,
    png: bool = True,
    save: bool = True,
) -> list[Path]:
    """:func:`sample_to_file` with a loaded run: the NIfTI file(s) (and, with ``png``, the mid-slice PNG, last).

    ``seed`` overrides the run's ``sample.seed`` for this volume (``idm3d sample --num``). ``save=False``
    runs everything but the writes and returns the same paths (the ranks other than 0 of a depth-sharded
    sample, :mod:`idm3d.inference.domain_sample`, which must run the same chain).
    """
    info = run.run.read_data_info()
    nifti_paths, png_path = output_paths(out, run.targets, dicom=run.config.data.intensity == "ct")
    record = _condition(run, conditions)
    if record is not None:  # translation: on the condition's grid, masked by its brain mask
        volume = run.masked(run.infer(condition=record.image[None], seed=seed, progress=progress), record.mask[None])
    else:
        volume = run.infer(shape=_unconditional_grid(run, shape, info), seed=seed, progress=progress)
    rows = {} if record is None else {m: record.image[i] for i, m in enumerate(record.modalities)}
    if not save:
        return [*nifti_paths, png_path] if png else nifti_paths
    for j, (target, path) in enumerate(zip(run.targets, nifti_paths)):
        rows[f"{target} (sampled)"] = volume[0, j]
        scaling = _scaling(info, target)
        mapped = scaling.inverse(volume[0, j]) if scaling is not None else volume[0, j]
        if record is not None:
            save_volume(path, record.to_original(mapped), record.original_affine)
        else:
            affine = np.asarray(info["grid_affine"]) if info and "grid_affine" in info else np.eye(4)
            save_volume(path, mapped.numpy(), affine)
    if not png:
        return nifti_paths
    sc = run.settings
    title = (f"{run.run_dir.name}: {sc.sampler} {sc.steps} steps, seed {sc.seed if seed is None else seed}, "
             f"{run.weights} weights")
    if sc.precision != "fp32":
        title += f", {sc.precision}"
    return [*nifti_paths, save_mid_slices(rows, png_path, title=title)]


def _condition(run: LoadedRun, conditions: Sequence[str | Path] | Mapping[str, str | Path] | None) -> CaseRecord | None:
    """Translation: the sources read and preprocessed as in training; unconditional runs take none."""
    cfg = run.config
    if not run.sources:
        if conditions:
            raise ConfigError("--condition: this run generates unconditionally; it takes no condition")
        return None
    if not conditions:
        raise ConfigError(f"--condition: this run translates {cfg.data.sources} -> {run.targets}; give the sources")
    record = _load_condition(parse_conditions(cfg.data.sources, conditions), cfg)
    _check_grid(run, tuple(record.image.shape[1:]))
    return record


def _unconditional_grid(run: LoadedRun, shape: Sequence[int] | None, info: Mapping | None) -> tuple[int, ...]:
    if shape is None and (not info or "grid_shape" not in info):
        raise ConfigError("--shape: the run has no data.json with a working grid; give the shape")
    return _check_grid(run, tuple(int(s) for s in (shape if shape is not None else info["grid_shape"])))


def _check_grid(run: LoadedRun, grid: tuple[int, ...]) -> tuple[int, ...]:
    multiple = size_multiple(run.model)
    if len(grid) != 3 or any(s < 1 or s % multiple for s in grid):
        raise ConfigError(f"--shape: expected 3 sizes that are multiples of {multiple}, got {list(grid)}")
    return grid
