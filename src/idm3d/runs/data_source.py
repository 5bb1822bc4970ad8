"""Where a run's data comes from: ``DataSource``, with the embedded demo templates or a data folder.

:func:`data_source` picks :class:`DemoSource` (``data.root`` null) or :class:`FolderSource`. Both answer
the same questions, from the config alone, and write nothing:

* :meth:`~DataSource.prepare`: the training data (checks, split, preprocessing, patch sampler) and what
  the run folder records of it (the split, the ``data.json`` summary), as :class:`PreparedData`;
* :meth:`~DataSource.heldout`: the held-out cases, one at a time.

The trainer's rank 0 saves what ``prepare`` returns through :class:`~idm3d.runs.rundir.RunDir`. The
split is drawn from the case ids and ``data.split_seed`` only, so every DDP process draws the same one.
Channel order is sources first, targets last (as :class:`~idm3d.data.dataset.VolumeDataset` expects),
and one :class:`~idm3d.data.preprocess.PreprocessConfig` serves training, sampling and evaluation.
"""

from __future__ import annotations

import abc
import contextlib
import functools
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
from idm3d.data.patch_schedule import PATCH_DIFFUSION_MIX, PatchSchedule, scaled_sizes
from idm3d.data.patches import PatchSampler
from idm3d.data.preprocess import CaseRecord, PreprocessConfig
from idm3d.data.split import Split, split_cases
from idm3d.errors import ArgumentError, ConfigError, DataError
from idm3d.runs.config import MIN_PATCH_EDGE, Config
from idm3d.runs.model_factory import required_multiple

__all__ = [
    "DataSource",
    "DemoSource",
    "FolderSource",
    "HeldoutCase",
    "PatchData",
    "PreparedData",
    "TrainingData",
    "check_data",
    "data_modalities",
    "data_source",
    "naming_keys",
    "patch_schedule",
    "preprocess_config",
    "step_batch",
]

_MAX_LISTED = 10
# The data layer's argument names (ArgumentError.argument) and the config keys they come from; any other
# ValueError is a bug, not bad input, and keeps its traceback.
_KEYS = {name: f"data.{name}" for name in ("patch_size", "batch_size", "foreground_prob", "percentiles", "margin",
                                           "spacing", "spatial_size", "intensity", "window", "foreground",
                                           "body_threshold")}
_KEYS["modalities"] = "data.sources/data.targets"
_KEYS["schedule"] = "data.patch.schedule"


@contextlib.contextmanager
def naming_keys() -> Iterator[None]:
    """Turn the data layer's :class:`~idm3d.errors.ArgumentError` about one of its arguments into a
    ConfigError naming the key (through the ``_KEYS`` table)."""
    try:
        yield
    except ArgumentError as err:
        if err.argument not in _KEYS:
            raise
        raise ConfigError(f"{_KEYS[err.argument]}: {err.detail}") from None


class TrainingData(Protocol):
    """Anything that yields the batch of a step: ``(target (B, T, *patch), source (B, S, *patch) or None)``.

    Data that also has ``positioned_batch(step) -> (target, source, position)`` tells where its patches lie
    (``position`` (B, 2, 3): corner and volume shape), which runs with coordinate channels need (without it
    each batch is taken for a whole volume); see :func:`step_batch`."""

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]: ...


def step_batch(data: TrainingData, step: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(target, source, position)`` of ``step``; ``position`` None for data that does not say where it lies."""
    positioned = getattr(data, "positioned_batch", None)
    if positioned is None:
        return (*data.batch(step), None)
    return positioned(step)


def patch_schedule(cfg: Config) -> PatchSchedule:
    """The patch sizes of ``data.patch.schedule`` (scales of ``data.patch_size``, rounded to the model's size step)."""
    d = cfg.data
    if d.patch.schedule == "fixed":
        multiple = required_multiple(cfg.model)
        if any(p % multiple for p in d.patch_size):
            raise ConfigError(f"data.patch_size: expected multiples of {multiple} (the model's size step: one halving "
                              f"per level after the first), got {d.patch_size}")
        return PatchSchedule.fixed(d.patch_size)
    pairs = PATCH_DIFFUSION_MIX if d.patch.schedule == "mixed" else [(s.scale, s.share) for s in d.patch.schedule]
    with naming_keys():
        sizes = scaled_sizes(d.patch_size, [scale for scale, _ in pairs], required_multiple(cfg.model), MIN_PATCH_EDGE)
        return PatchSchedule(sizes, [share for _, share in pairs])


def data_modalities(cfg: Config) -> tuple[str, ...]:
    """Channels to load, sources first and targets last."""
    sources = tuple(cfg.data.sources) if cfg.data.task == "translate" else ()
    return (*sources, *cfg.data.targets)


def preprocess_config(cfg: Config) -> PreprocessConfig:
    """The preprocessing every part of a run uses (:meth:`DataSource.preprocess_config` of its source)."""
    return data_source(cfg).preprocess_config()


def foreground_mode(cfg: Config) -> str:
    """``data.foreground``, with ``auto`` resolved: the brain mask for MRI (percentile), the body mask for CT."""
    d = cfg.data
    if d.foreground != "auto":
        return d.foreground
    return "body" if d.intensity == "ct" else "brain"


def data_root(cfg: Config) -> Path:
    """The data folder ``data.root`` (DataError for the demo data, which has none)."""
    if cfg.data.root is None:
        raise DataError("data.root: this run uses the embedded demo data, not a data folder")
    return Path(cfg.data.root)


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
    with naming_keys():
        problems = check_dataset(root, data_modalities(cfg))
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"data check failed with {len(problems)} problem(s): {listed}{more}")
    return root


class PatchData:
    """Training batches from :class:`~idm3d.data.patches.PatchSampler`: target, source and the patches' position."""

    def __init__(self, sampler: PatchSampler, has_source: bool) -> None:
        self.sampler = sampler
        self.has_source = has_source

    def positioned_batch(self, step: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(target, source, position)``: the batch and where its patches lie (corner, volume shape)."""
        out = self.sampler.batch(step)
        return out["target"].float(), (out["source"].float() if self.has_source else None), out["position"]

    def batch(self, step: int) -> tuple[Tensor, Tensor | None]:
        return self.positioned_batch(step)[:2]


@dataclass
class HeldoutCase:
    """A held-out volume on the preprocessed grid: channels in :func:`data_modalities` order, in [-1, 1]."""

    case_id: str
    image: Tensor
    mask: Tensor
    affine: np.ndarray
    modalities: tuple[str, ...]
    # (2, 3): the case's lowest corner in its whole volume and that volume's shape (coordinate channels);
    # None: the case is a whole volume.
    position: Tensor | None = None

    def channels(self, names: list[str] | tuple[str, ...]) -> Tensor:
        return torch.cat([self.image[self.modalities.index(m)][None] for m in names])


@dataclass
class PreparedData:
    """What :meth:`DataSource.prepare` returns: the batches, and what the run folder records of them."""

    data: PatchData
    info: dict[str, Any]  # data.json: modalities, reference and working grids, intensity scalings
    split: Split | None = None  # split.json (folder data)

    @property
    def scalings(self) -> dict[str, dict[str, float]]:
        """Per modality the median ``{"lo", "hi"}`` intensity scaling of the training cases."""
        return self.info["scalings"]


class DataSource(abc.ABC):
    """The data of a run, from its config; subclasses say where the volumes come from."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.modalities = data_modalities(cfg)

    def grid(self) -> tuple[float | tuple[float, ...] | None, int]:
        """``(spacing in mm or None, size multiple)`` of the working grid: ``data.spacing``, the model's step."""
        d = self.cfg.data
        spacing = None if d.spacing is None else (d.spacing[0] if len(d.spacing) == 1 else tuple(d.spacing))
        return spacing, required_multiple(self.cfg.model)

    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing every part of a run uses; volumes come out a multiple of the model's size step."""
        d = self.cfg.data
        spacing, multiple = self.grid()
        with naming_keys():
            return PreprocessConfig(
                spacing=spacing,
                margin=d.margin,
                spatial_size=None if d.spatial_size is None else tuple(d.spatial_size),
                divisible_by=multiple,
                percentiles=(d.percentiles[0], d.percentiles[1]),
                # Translation crops/masks by the sources: at sampling time they are all there is.
                mask_from=tuple(d.sources) if d.task == "translate" else tuple(d.targets),
                intensity=d.intensity,
                window=(d.window[0], d.window[1]),
                foreground=foreground_mode(self.cfg),
                body_threshold=d.body_threshold,
            )

    @abc.abstractmethod
    def prepare(self, saved_split: Split | None = None) -> PreparedData:
        """Check the data, split it (keeping ``saved_split``, a resumed run's), preprocess, sample patches."""

    @abc.abstractmethod
    def heldout(self, split: Split | None, part: str = "test") -> Iterator[HeldoutCase]:
        """The held-out cases of ``part``, loaded one at a time."""

    def _sampler(self, volumes: list[Tensor], masks: list[Tensor | None], regions: list | None) -> PatchData:
        d = self.cfg.data
        n_src = len(self.modalities) - len(d.targets)
        with naming_keys():
            sampler = PatchSampler(
                volumes, masks, d.patch_size, batch_size=d.batch_size, seed=self.cfg.train.seed,
                foreground_prob=d.foreground_prob, regions=regions,
                target_channels=list(range(n_src, len(self.modalities))), schedule=patch_schedule(self.cfg),
            )
        return PatchData(sampler, has_source=n_src > 0)

    def _info(self, records: list[CaseRecord], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        # The median scaling of the training cases maps a synthesised target back to typical intensities
        # when no reference image of that modality exists (translation at sampling time).
        scalings = {
            m: {"lo": float(np.median([r.scalings[m].lo for r in records])),
                "hi": float(np.median([r.scalings[m].hi for r in records]))}
            for m in self.modalities
        }
        return {
            "modalities": list(self.modalities),
            "reference_case": records[0].case_id,
            "reference_affine": np.asarray(records[0].original_affine).tolist(),
            "reference_shape": list(records[0].original_shape),
            "grid_affine": np.asarray(records[0].affine).tolist(),
            "grid_shape": list(records[0].image.shape[1:]),
            "scalings": scalings,
            **(extra or {}),
        }


class DemoSource(DataSource):
    """The MNI demo templates: patches from the training slabs, the held-out axial band as the one test case."""

    def grid(self) -> tuple[float, int]:
        """2 mm isotropic unless ``data.spacing``; a multiple of 16 (the held-out band's depth)."""
        d = self.cfg.data
        if d.spacing is not None and len(set(d.spacing)) != 1:
            raise ConfigError(f"data.spacing: the demo data takes one isotropic spacing, got {d.spacing}")
        return (2.0 if d.spacing is None else float(d.spacing[0])), math.lcm(16, required_multiple(self.cfg.model))

    @property
    def demo(self) -> DemoData:
        """The MNI templates, preprocessed as :meth:`grid` says (loaded once per process and setting)."""
        spacing, multiple = self.grid()
        d = self.cfg.data
        with naming_keys():
            return _load_demo_cached(spacing, max(16, required_multiple(self.cfg.model)), multiple,
                                     (d.percentiles[0], d.percentiles[1]))

    def prepare(self, saved_split: Split | None = None) -> PreparedData:
        demo = self.demo
        volume = torch.cat([demo.record.channel(m) for m in self.modalities])
        # Training around the band: the template twice, one region each (each patch draws one of the two).
        regions = demo.train_regions(self.cfg.data.demo_split)
        data = self._sampler([volume] * len(regions), [demo.mask] * len(regions), regions)
        return PreparedData(data, self._info([demo.record], {"demo": demo.describe(self.cfg.data.demo_split)}))

    def heldout(self, split: Split | None = None, part: str = "test") -> Iterator[HeldoutCase]:
        if part != "test":
            raise ConfigError(f"--split {part}: the demo data has only a 'test' part (its held-out axial slabs)")
        demo = self.demo
        band = demo.test_slices
        shift = np.eye(4)
        shift[2, 3] = band.start
        image = torch.cat([demo.test_band(demo.record.channel(m)) for m in self.modalities])
        # The band's place in the template: a run with coordinate channels sees where the band lies.
        position = torch.tensor([[0, 0, band.start], list(demo.record.image.shape[1:])])
        yield HeldoutCase(f"{demo.record.case_id}[z={band.start}:{band.stop}]", image.contiguous(),
                          demo.test_band(demo.mask).contiguous(), demo.affine @ shift, self.modalities, position)


class FolderSource(DataSource):
    """A folder of cases (BraTS2020 or generic layout), split by case."""

    def split(self, case_ids: list[str], saved: Split | None) -> Split:
        """``saved`` (checked against the folder) or a new split drawn with ``data.split_seed``."""
        if saved is not None:
            missing = sorted(set(saved.train + saved.val + saved.test) - set(case_ids))
            if missing:
                raise DataError(f"split.json: cases {missing[:5]} of the saved split are not in the data folder")
            return saved
        d = self.cfg.data
        fractions = (1.0 - d.val_fraction - d.test_fraction, d.val_fraction, d.test_fraction)
        try:
            return split_cases(case_ids, fractions, seed=d.split_seed)
        except ArgumentError as err:  # too few cases for these fractions
            raise DataError(f"data.root {d.root}: {err.detail} (data.val_fraction, data.test_fraction)") from None

    def prepare(self, saved_split: Split | None = None) -> PreparedData:
        root = check_data(self.cfg)
        with naming_keys():
            cases = find_cases(root, self.modalities)
            split = self.split([c.case_id for c in cases], saved_split)
            dataset = VolumeDataset(cases, self.modalities, self.preprocess_config(), case_ids=split.train)
            records = [dataset[i] for i in range(len(dataset))]
        data = self._sampler([r.image for r in records], [r.mask for r in records], None)
        return PreparedData(data, self._info(records), split)

    def heldout(self, split: Split | None, part: str = "test") -> Iterator[HeldoutCase]:
        if part not in ("train", "val", "test"):
            raise ConfigError(f"--split: expected train|val|test, got {part!r}")
        if split is None:
            raise DataError(f"data.root {self.cfg.data.root}: the run has no split.json")
        ids = list(getattr(split, part))
        if not ids:
            raise DataError(f"split.json: the '{part}' part of the split is empty")
        with naming_keys():
            dataset = VolumeDataset(data_root(self.cfg), self.modalities, self.preprocess_config(), case_ids=ids,
                                    cache=False)
        for i in range(len(dataset)):
            with naming_keys():
                r = dataset[i]
            yield HeldoutCase(r.case_id, r.image, r.mask, r.affine, tuple(r.modalities))


def data_source(cfg: Config) -> DataSource:
    """:class:`DemoSource` when ``data.root`` is null, else :class:`FolderSource`."""
    return DemoSource(cfg) if cfg.data.root is None else FolderSource(cfg)


