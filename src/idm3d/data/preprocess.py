"""Preprocessing of one case with MONAI array transforms, keeping what is needed to undo it.

Pipeline (all modalities of a case stacked as channels, so they stay aligned):

1. ``Orientation`` to RAS (voxel axes x=Right, y=Anterior, z=Superior: the last axis is axial);
2. optional ``Spacing`` to a working voxel size (bilinear);
3. ``CropForeground`` to the foreground-mask box plus a margin (``foreground``: the brain mask by default,
   a CT body mask, or none: :mod:`idm3d.data.intensity`);
4. per-volume percentile clipping and scaling to [-1, 1] (``ScaleIntensityRange`` with percentiles
   measured inside the brain mask; the values are kept in :class:`IntensityScaling` for the inverse), or with
   ``intensity="ct"`` one fixed HU ``window`` for every volume;
5. ``DivisiblePad`` to a multiple of ``divisible_by`` (or ``ResizeWithPadOrCrop`` to a fixed size),
   padding with -1 (background after scaling).

The MONAI transforms record themselves on a :class:`monai.data.MetaTensor`, so
:meth:`CaseRecord.to_original` puts a prediction back on the original grid and intensity scale.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import CropForeground, DivisiblePad, Orientation, ResizeWithPadOrCrop, ScaleIntensityRange
from monai.transforms import Spacing as MonaiSpacing
from monai.utils import TraceKeys

from idm3d.data.cases import LABEL_MODALITIES
from idm3d.data.intensity import check_modes, foreground_mask
from idm3d.data.readers import save_image
from idm3d.errors import ArgumentError, DataError

__all__ = ["CaseRecord", "IntensityScaling", "PreprocessConfig", "preprocess_case"]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessConfig:
    """Options of :func:`preprocess_case`.

    Attributes:
        orientation: axis codes to reorient to (``"RAS"``), or None to keep the stored voxel order.
        spacing: working voxel size in mm (one number or three), or None to keep the native grid.
        crop_foreground: crop to the bounding box of the brain mask (plus ``margin`` voxels).
        margin: voxels kept around the mask box.
        spatial_size: fixed output size (centre crop/pad); None pads up to a multiple of ``divisible_by``.
        divisible_by: output sizes are multiples of this (a U-Net with ``levels`` levels needs 2**(levels-1)).
        percentiles: lower/upper intensity percentiles (inside the mask) mapped to -1 and 1; values outside
            are clipped.
        foreground_threshold: a voxel is foreground when any ``mask_from`` modality exceeds this value.
        mask_from: modalities defining the brain mask; None means every requested modality.
        intensity: ``percentile`` (per volume, MRI) or ``ct`` (the fixed HU ``window`` -> [-1, 1]).
        window: ``(lower, upper)`` HU of the ``ct`` mode; values outside are clipped.
        foreground: ``brain`` (``foreground_threshold``), ``body`` (CT: ``body_threshold`` HU, largest
            component) or ``none`` (every voxel).
        body_threshold: HU above which a voxel may belong to the body mask.
    """

    orientation: str | None = "RAS"
    spacing: float | tuple[float, float, float] | None = None
    crop_foreground: bool = True
    margin: int = 2
    spatial_size: tuple[int, int, int] | None = None
    divisible_by: int = 16
    percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_threshold: float = 0.0
    mask_from: tuple[str, ...] | None = None
    intensity: str = "percentile"
    window: tuple[float, float] = (-1000.0, 1000.0)
    foreground: str = "brain"
    body_threshold: float = -500.0

    def __post_init__(self) -> None:
        check_modes(self.intensity, self.window, self.foreground)
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ArgumentError("percentiles", f"expected 0 <= lower < upper <= 100, got {self.percentiles}")
        if self.divisible_by < 1:
            raise ArgumentError("divisible_by", f"expected a positive integer, got {self.divisible_by}")
        if self.margin < 0:
            raise ArgumentError("margin", f"expected >= 0 voxels, got {self.margin}")
        if self.spacing is not None and any(s <= 0 for s in np.atleast_1d(self.spacing)):
            raise ArgumentError("spacing", f"expected positive millimetres, got {self.spacing}")
        if self.spatial_size is not None and (len(self.spatial_size) != 3 or min(self.spatial_size) < 1):
            raise ArgumentError("spatial_size", f"expected three positive sizes, got {self.spatial_size}")


@dataclass(frozen=True)
class IntensityScaling:
    """Affine map of intensities ``[lo, hi] -> [b_min, b_max]`` (clipped), with its inverse."""

    lo: float
    hi: float
    b_min: float = -1.0
    b_max: float = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clip to ``[lo, hi]`` and scale to ``[b_min, b_max]``."""
        out = ScaleIntensityRange(self.lo, self.hi, self.b_min, self.b_max, clip=True)(x)
        return torch.as_tensor(out, dtype=torch.float32)

    def inverse(self, y: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Map scaled values back to the original intensity units (clipped values stay at lo/hi)."""
        return self.lo + (y - self.b_min) * ((self.hi - self.lo) / (self.b_max - self.b_min))

    def to_dict(self) -> dict[str, float]:
        return {"lo": self.lo, "hi": self.hi, "b_min": self.b_min, "b_max": self.b_max}

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> IntensityScaling:
        return cls(**{k: float(data[k]) for k in ("lo", "hi", "b_min", "b_max")})


@dataclass
class CaseRecord:
    """A preprocessed case.

    Attributes:
        case_id: the case's name (its folder).
        modalities: channel names, in channel order.
        image: float32 tensor (C, X, Y, Z) in [-1, 1]; spatial axes are the RAS voxel axes, z is axial.
        mask: bool tensor (1, X, Y, Z), the brain mask on the same grid.
        affine: 4x4 voxel-to-world affine of ``image`` (write outputs with it to keep them in place).
        scalings: per-modality intensity scaling, for :meth:`IntensityScaling.inverse`.
        original_affine: affine of the files as read.
        original_shape: spatial shape of the files as read.
        background: the value (original units) :meth:`to_original` puts outside the crop box and the
            grid: 0 for MRI, the window's lower end (air) for CT.
    """

    case_id: str
    modalities: tuple[str, ...]
    image: torch.Tensor
    mask: torch.Tensor
    affine: np.ndarray
    scalings: dict[str, IntensityScaling]
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    background: float = 0.0
    _transforms: list = field(default_factory=list, repr=False)
    _operations: list = field(default_factory=list, repr=False)

    def channel(self, modality: str) -> torch.Tensor:
        """The (1, X, Y, Z) channel of one modality."""
        if modality not in self.modalities:
            raise ArgumentError("modality", f"{self.case_id} has {list(self.modalities)}, not {modality!r}")
        i = self.modalities.index(modality)
        return self.image[i : i + 1]

    def to_original(self, volume: torch.Tensor | np.ndarray, modality: str | None = None) -> np.ndarray:
        """Undo the preprocessing of a (1, X, Y, Z) or (X, Y, Z) volume on this case's grid.

        Args:
            volume: e.g. a synthesised target, on the preprocessed grid.
            modality: whose intensity scaling to invert; None leaves intensities as they are.

        Returns:
            float32 array on the original grid (``original_shape``; write it with ``original_affine``).
        """
        vol = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume).detach().cpu().float()
        vol = vol[None] if vol.ndim == 3 else vol
        if tuple(vol.shape[1:]) != tuple(self.image.shape[1:]):
            raise DataError(
                f"{self.case_id}: volume shape {tuple(vol.shape[1:])} is not the case grid "
                f"{tuple(self.image.shape[1:])}"
            )
        if modality is not None:
            vol = self.scalings[modality].inverse(vol)
        # The inverse transforms pad with zeros (crop box, resampling): shift so that padding is the background.
        vol = vol - self.background if self.background else vol
        # MONAI matches each record to its transform by id(); a pickled record (DataLoader worker) holds new
        # transform objects, so switch the check off: the records are replayed in exactly their own order.
        operations = _without_ids(copy.deepcopy(self._operations))
        meta = MetaTensor(vol, affine=torch.as_tensor(self.affine), applied_operations=operations)
        for transform in reversed(self._transforms):
            meta = transform.inverse(meta)
        out = meta.as_tensor()[0]
        return (out + self.background if self.background else out).numpy().astype(np.float32)

    def save(
        self,
        path: str | os.PathLike,
        volume: torch.Tensor | np.ndarray,
        modality: str | None = None,
        *,
        original_grid: bool = True,
    ) -> None:
        """Write a volume on the original grid (default) or on the preprocessed grid.

        The format follows ``path``'s name (NIfTI, NRRD, MetaImage, or a DICOM series folder).
        """
        if original_grid:
            save_image(path, self.to_original(volume, modality), self.original_affine)
        else:
            vol = torch.as_tensor(volume).detach().cpu().float()
            if modality is not None:
                vol = self.scalings[modality].inverse(vol)
            save_image(path, vol.numpy(), self.affine)


def _without_ids(value: object) -> object:
    if isinstance(value, dict):
        return {k: (TraceKeys.NONE if k == TraceKeys.ID else _without_ids(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def _above_half(x: torch.Tensor) -> torch.Tensor:
    # A named function, not a lambda, so records (which keep their transforms) can be pickled.
    return x > 0.5


def _percentile_scaling(values: torch.Tensor, percentiles: tuple[float, float], name: str) -> IntensityScaling:
    lo, hi = np.percentile(values.numpy(), percentiles)
    if not hi > lo:
        raise DataError(f"{name}: intensities inside the brain mask are constant ({lo:g}); cannot scale")
    return IntensityScaling(float(lo), float(hi))


def preprocess_case(
    volumes: Mapping[str, np.ndarray],
    affine: np.ndarray,
    config: PreprocessConfig | None = None,
    *,
    mask: np.ndarray | None = None,
    case_id: str = "case",
) -> CaseRecord:
    """Apply the module's pipeline to the co-registered volumes of one case.

    Args:
        volumes: float arrays (X, Y, Z) by modality, all on the grid of ``affine``.
        affine: their voxel-to-world affine.
        config: options; defaults to :class:`PreprocessConfig`.
        mask: brain mask on the same grid; None derives it from ``config.mask_from`` foreground.
        case_id: name used in messages.

    Raises:
        DataError: empty mask, or constant intensities inside it.
        ValueError: a label modality (e.g. ``seg``) requested as an image channel, or unknown ``mask_from``.
    """
    config = config or PreprocessConfig()
    names = tuple(volumes)
    labels = [m for m in names if m in LABEL_MODALITIES]
    if labels:
        raise ArgumentError("modalities", f"{labels} are label maps; only intensity images can be image channels")
    mask_from = config.mask_from or names
    if unknown := [m for m in mask_from if m not in names]:
        raise ArgumentError("mask_from", f"{unknown} not among the case's modalities {list(names)}")
    arrays = [np.asarray(volumes[m], dtype=np.float32) for m in names]
    given_mask = mask is not None
    if mask is None:
        mask = foreground_mask(volumes, mask_from, config.foreground, threshold=config.foreground_threshold,
                               body_threshold=config.body_threshold)
    stack = np.stack([*arrays, np.asarray(mask, dtype=np.float32)])
    original_shape = tuple(int(s) for s in stack.shape[1:])
    meta = MetaTensor(torch.from_numpy(stack), affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))

    transforms: list = []
    if config.orientation:
        transforms.append(Orientation(axcodes=config.orientation, labels=_RAS_LABELS))
    if config.spacing is not None:
        # CT: beyond the field of view is the edge value, not 0 HU (water); MRI keeps zeros (background 0).
        padding = "border" if config.intensity == "ct" else "zeros"
        transforms.append(MonaiSpacing(pixdim=config.spacing, mode="bilinear", padding_mode=padding))
    if config.crop_foreground:
        # The mask is the last channel; bilinear resampling blurs it, so threshold at one half.
        transforms.append(
            CropForeground(select_fn=_above_half, channel_indices=len(names), margin=config.margin, allow_smaller=True)
        )
    for transform in transforms:
        meta = transform(meta)

    brain = meta[-1:].as_tensor() > 0.5
    if not bool(brain.any()):
        body = config.foreground == "body"
        threshold = f"{config.body_threshold:g} HU" if body else f"{config.foreground_threshold:g}"
        origin = "the given mask" if given_mask else f"no voxel of {list(mask_from)} above {threshold}"
        raise DataError(f"{case_id}: {'body' if body else 'brain'} mask is empty ({origin})")
    if config.intensity == "ct":
        scalings = {m: IntensityScaling(float(config.window[0]), float(config.window[1])) for m in names}
    else:
        scalings = {
            m: _percentile_scaling(meta[i].as_tensor()[brain[0]].float(), config.percentiles, f"{case_id} {m}")
            for i, m in enumerate(names)
        }
    scaled = torch.stack([scalings[m].forward(meta[i].as_tensor().float()) for i, m in enumerate(names)])
    meta = MetaTensor(torch.cat([scaled, brain.float()]), meta=meta.meta, applied_operations=meta.applied_operations)

    pad = (
        ResizeWithPadOrCrop(config.spatial_size, value=-1.0)
        if config.spatial_size is not None
        else DivisiblePad(config.divisible_by, value=-1.0)
    )
    meta = pad(meta)
    transforms.append(pad)

    out = meta.as_tensor()
    return CaseRecord(
        case_id=case_id,
        modalities=names,
        image=out[:-1].float().contiguous(),
        mask=(out[-1:] > 0.5).contiguous(),
        affine=np.asarray(meta.affine, dtype=np.float64),
        scalings=scalings,
        original_affine=np.asarray(affine, dtype=np.float64),
        original_shape=original_shape,
        background=float(config.window[0]) if config.intensity == "ct" else 0.0,
        _transforms=transforms,
        _operations=copy.deepcopy(meta.applied_operations),
    )
