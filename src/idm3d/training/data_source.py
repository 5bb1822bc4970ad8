"""Glue between the run configuration and the data layer (:mod:`idm3d.data`).

Everything the trainer, the sampler and the evaluator need from the data goes through here, so the three
agree on channel order (sources first, targets last, as :class:`~idm3d.data.dataset.VolumeDataset`
expects), on preprocessing (one :class:`~idm3d.data.preprocess.PreprocessConfig` derived from the config)
and on the split (``split.json`` in the run folder, written once).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from idm3d.data.cases import check_dataset, find_cases
from idm3d.data.dataset import VolumeDataset
from idm3d.data.demo import DemoData, load_demo
from idm3d.data.patches import PatchSampler
from idm3d.data.preprocess import CaseRecord, PreprocessConfig
from idm3d.data.split import Split, load_split, save_split, split_cases
from idm3d.errors import ConfigError, DataError
from idm3d.training import run as runlib
from idm3d.training.checkpoint import atomic_write_text
from idm3d.training.config import Config
from idm3d.training.model_factory import required_multiple

__all__ = [
    "HeldoutCase",
    "PatchData",
    "TrainingData",
    "build_training_data",
    "check_data",
    "data_modalities",
    "heldout_cases",
    "load_demo_data",
    "prepare_split",
    "preprocess_config",
    "read_data_info",
]

_MAX_LISTED = 10


class TrainingData(Protocol):
    """Anything that yields the batch of a step: ``(target (B, T, *patch), source (B, S, *patch) or None)``."""

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]: ...


def data_modalities(cfg: Config) -> tuple[str, ...]:
    """Channels to load, sources first and targets last."""
    sources = tuple(cfg.data.sources) if cfg.data.task == "translate" else ()
    return (*sources, *cfg.data.targets)


def preprocess_config(cfg: Config) -> PreprocessConfig:
    """The preprocessing every part of a run uses; volumes come out a multiple of the model's size step."""
    d = cfg.data
    spacing = None if d.spacing is None else (d.spacing[0] if len(d.spacing) == 1 else tuple(d.spacing))
    multiple = required_multiple(cfg.model)
    if d.root is None:  # match load_demo_data, so a demo-trained model sees inputs prepared the same way
        spacing = 2.0 if spacing is None else spacing
        multiple = math.lcm(16, multiple)
    return PreprocessConfig(
        spacing=spacing,
        margin=d.margin,
        spatial_size=None if d.spatial_size is None else tuple(d.spatial_size),
        divisible_by=multiple,
        percentiles=(d.percentiles[0], d.percentiles[1]),
        # Translation crops/masks by the sources: at sampling time they are all there is.
        mask_from=tuple(d.sources) if d.task == "translate" else tuple(d.targets),
    )


def data_root(cfg: Config) -> Path:
    """The data folder ``data.root`` (DataError for the demo data, which has none)."""
    if cfg.data.root is None:
        raise DataError("data.root: this run uses the embedded demo data, not a data folder")
    return Path(cfg.data.root)


def load_demo_data(cfg: Config) -> DemoData:
    """The MNI demo templates preprocessed like the config says (2 mm unless ``data.spacing``)."""
    d = cfg.data
    spacing = 2.0 if d.spacing is None else float(d.spacing[0])
    if d.spacing is not None and len(set(d.spacing)) != 1:
        raise ConfigError(f"data.spacing: the demo data takes one isotropic spacing, got {d.spacing}")
    multiple = required_multiple(cfg.model)
    return _load_demo_cached(spacing, max(16, multiple), math.lcm(16, multiple), (d.percentiles[0], d.percentiles[1]))


@functools.lru_cache(maxsize=2)
def _load_demo_cached(
    spacing: float, n_test_slices: int, divisible_by: int, percentiles: tuple[float, float]
) -> DemoData:
    # Training, evaluation and the demo's reference each ask for the same templates; loading and
    # resampling them takes seconds. Callers only read the result (they slice and concatenate copies).
    return load_demo(spacing, n_test_slices=n_test_slices, divisible_by=divisible_by, percentiles=percentiles)


def check_data(cfg: Config) -> Path:
    """Run the dataset checks; raise one DataError listing every problem (up to ten, then a count)."""
    root = data_root(cfg)
    problems = check_dataset(root, data_modalities(cfg))
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"data check failed with {len(problems)} problem(s): {listed}{more}")
    return root


def prepare_split(cfg: Config, run_dir: Path, case_ids: list[str]) -> Split:
    """The run's split: read from ``split.json`` if present (a resumed run), else drawn and saved."""
    path = run_dir / runlib.SPLIT
    if path.is_file():
        split = load_split(path)
        missing = sorted(set(split.train + split.val + split.test) - set(case_ids))
        if missing:
            raise DataError(f"{path}: cases {missing[:5]} of the saved split are not in the data folder")
        return split
    d = cfg.data
    fractions = (1.0 - d.val_fraction - d.test_fraction, d.val_fraction, d.test_fraction)
    split = split_cases(case_ids, fractions, seed=d.split_seed)
    save_split(path, split)
    return split


def _write_data_info(
    run_dir: Path, records: list[CaseRecord], modalities: tuple[str, ...], extra: dict[str, Any] | None = None
) -> None:
    # The median scaling of the training cases maps a synthesised target back to typical intensities when
    # no reference image of that modality exists (translation at sampling time).
    scalings = {
        m: {
            "lo": float(np.median([r.scalings[m].lo for r in records])),
            "hi": float(np.median([r.scalings[m].hi for r in records])),
        }
        for m in modalities
    }
    info = {
        "modalities": list(modalities),
        "reference_case": records[0].case_id,
        "reference_affine": np.asarray(records[0].original_affine).tolist(),
        "reference_shape": list(records[0].original_shape),
        "grid_affine": np.asarray(records[0].affine).tolist(),
        "grid_shape": list(records[0].image.shape[1:]),
        "scalings": scalings,
        **(extra or {}),
    }
    atomic_write_text(run_dir / runlib.DATA_INFO, json.dumps(info, indent=2) + "\n")


def read_data_info(run_dir: str | Path) -> dict[str, Any] | None:
    """``data.json`` of a run (reference affine, typical intensity scaling), or ``None``."""
    path = Path(run_dir) / runlib.DATA_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path}: not valid JSON ({err})") from None
    _check_data_info(info, path)
    return info


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_data_info(info: Any, path: Path) -> None:
    """The fields sampling reads must have the expected types: a hand-edited data.json fails here, in one line."""
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(info).__name__}")
    scalings = info.get("scalings", {})
    if not isinstance(scalings, dict) or not all(
        isinstance(s, dict) and _is_number(s.get("lo")) and _is_number(s.get("hi")) for s in scalings.values()
    ):
        raise DataError(f"{path}: 'scalings' must map each modality to {{\"lo\": number, \"hi\": number}}")
    shape = info.get("grid_shape")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)
    ):
        raise DataError(f"{path}: 'grid_shape' must be 3 positive integers, got {shape!r}")
    for key in ("grid_affine", "reference_affine"):
        a = info.get(key)
        if a is not None and not (
            isinstance(a, list) and len(a) == 4
            and all(isinstance(row, list) and len(row) == 4 and all(map(_is_number, row)) for row in a)
        ):
            raise DataError(f"{path}: '{key}' must be a 4x4 list of numbers")


class PatchData:
    """Training batches from :class:`~idm3d.data.patches.PatchSampler`, split into target and source."""

    def __init__(self, sampler: PatchSampler, has_source: bool) -> None:
        self.sampler = sampler
        self.has_source = has_source

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        out = self.sampler.batch(step)
        return out["target"].float(), (out["source"].float() if self.has_source else None)


def build_training_data(cfg: Config, run_dir: Path) -> PatchData:
    """Check the data, split it (saved in the run folder), preprocess the training cases, sample patches.

    With ``data.root`` null the MNI demo templates are used: patches come from the training slabs only.
    """
    modalities = data_modalities(cfg)
    regions = None
    if cfg.data.root is None:
        demo = load_demo_data(cfg)
        volumes = [torch.cat([demo.record.channel(m) for m in modalities])]
        masks, regions = [demo.mask], [demo.train_region]
        _write_data_info(run_dir, [demo.record], modalities, {"demo": demo.describe()})
    else:
        root = check_data(cfg)
        cases = find_cases(root, modalities)
        split = prepare_split(cfg, run_dir, [c.case_id for c in cases])
        dataset = VolumeDataset(cases, modalities, preprocess_config(cfg), case_ids=split.train)
        records = [dataset[i] for i in range(len(dataset))]
        _write_data_info(run_dir, records, modalities)
        volumes, masks = [r.image for r in records], [r.mask for r in records]
    n_src = len(modalities) - len(cfg.data.targets)
    sampler = PatchSampler(
        volumes,
        masks,
        cfg.data.patch_size,
        batch_size=cfg.data.batch_size,
        seed=cfg.train.seed,
        foreground_prob=cfg.data.foreground_prob,
        regions=regions,
        target_channels=list(range(n_src, len(modalities))),
    )
    return PatchData(sampler, has_source=n_src > 0)


@dataclass
class HeldoutCase:
    """A held-out volume on the preprocessed grid: channels in :func:`data_modalities` order, in [-1, 1]."""

    case_id: str
    image: Tensor
    mask: Tensor
    affine: np.ndarray
    modalities: tuple[str, ...]

    def channels(self, names: list[str] | tuple[str, ...]) -> Tensor:
        return torch.cat([self.image[self.modalities.index(m)][None] for m in names])


def heldout_cases(cfg: Config, run_dir: Path, part: str = "test") -> Iterator[HeldoutCase]:
    """The held-out cases of a run, loaded one at a time.

    Folder data: the ``part`` of the run's ``split.json``. Demo data: the held-out axial slabs of the
    template (``part`` must be ``test``).
    """
    modalities = data_modalities(cfg)
    if cfg.data.root is None:
        if part != "test":
            raise ConfigError(f"--split {part}: the demo data has only a 'test' part (its held-out axial slabs)")
        demo = load_demo_data(cfg)
        band = demo.test_slices
        shift = np.eye(4)
        shift[2, 3] = band.start
        image = torch.cat([demo.test_band(demo.record.channel(m)) for m in modalities])
        yield HeldoutCase(f"{demo.record.case_id}[z={band.start}:{band.stop}]", image.contiguous(),
                          demo.test_band(demo.mask).contiguous(), demo.affine @ shift, modalities)
        return
    split_path = Path(run_dir) / runlib.SPLIT
    split = load_split(split_path)
    if part not in ("train", "val", "test"):
        raise ConfigError(f"--split: expected train|val|test, got {part!r}")
    ids = list(getattr(split, part))
    if not ids:
        raise DataError(f"{split_path}: the '{part}' part of the split is empty")
    dataset = VolumeDataset(data_root(cfg), modalities, preprocess_config(cfg), case_ids=ids, cache=False)
    for i in range(len(dataset)):
        r = dataset[i]
        yield HeldoutCase(r.case_id, r.image, r.mask, r.affine, tuple(r.modalities))
