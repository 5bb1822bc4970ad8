"""Intensity and foreground modes: per-volume percentiles (MRI) or a fixed HU window (CT); brain, body or no mask.

* ``percentile`` (MRI, arbitrary units): each volume's ``percentiles`` inside its foreground mask map to
  [-1, 1]; the inverse uses the training cases' median (:mod:`idm3d.data.preprocess`).
* ``ct`` (Hounsfield units are physical): every volume is clipped to one ``window`` ``[lo, hi]`` HU and mapped
  linearly to [-1, 1], so ``x`` means the same tissue in every scan and outputs map back to HU exactly.

Foreground (what the crop box and the foreground patch draws use):

* ``brain``: any mask modality above ``foreground_threshold`` (a skull-stripped head MRI; today's default);
* ``body``: the largest connected component above ``body_threshold`` HU (default -500: air out, fat and
  tissue in), holes filled (lungs, bowel gas stay inside);
* ``none``: every voxel (no crop).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from idm3d.errors import ArgumentError

__all__ = ["FOREGROUND_MODES", "INTENSITY_MODES", "body_mask", "check_modes", "foreground_mask"]

INTENSITY_MODES: tuple[str, ...] = ("percentile", "ct")
FOREGROUND_MODES: tuple[str, ...] = ("brain", "body", "none")


def check_modes(intensity: str, window: Sequence[float], foreground: str) -> None:
    """Raise ``ValueError("<argument>: ...")`` for an unknown mode or an empty window."""
    if intensity not in INTENSITY_MODES:
        raise ArgumentError("intensity", f"expected one of {'|'.join(INTENSITY_MODES)}, got {intensity!r}")
    if len(window) != 2 or not float(window[0]) < float(window[1]):
        raise ArgumentError("window", f"expected [lower, upper] HU with lower < upper, got {list(window)}")
    if foreground not in FOREGROUND_MODES:
        raise ArgumentError("foreground", f"expected one of {'|'.join(FOREGROUND_MODES)}, got {foreground!r}")


def body_mask(volume: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """The body of a CT volume: voxels above ``threshold`` HU, largest 3D connected component, holes filled.

    Args:
        volume: (X, Y, Z) HU values.
        threshold: HU above which a voxel may be body (air is -1000, fat about -100).

    Returns:
        bool array of ``volume``'s shape (all False when no voxel exceeds ``threshold``).
    """
    import SimpleITK as sitk

    above = np.asarray(volume) > threshold
    if not above.any():
        return above
    image = sitk.GetImageFromArray(above.astype(np.uint8))
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True) == 1
    filled = sitk.BinaryFillhole(largest)
    return sitk.GetArrayFromImage(filled).astype(bool)


def foreground_mask(
    volumes: Mapping[str, np.ndarray], mask_from: Sequence[str], mode: str, *, threshold: float, body_threshold: float
) -> np.ndarray:
    """The foreground of a case by ``mode`` (``brain``, ``body`` or ``none``) from the ``mask_from`` volumes."""
    arrays = [np.asarray(volumes[m]) for m in mask_from]
    if mode == "none":
        return np.ones(arrays[0].shape, dtype=bool)
    if mode == "body":
        return np.any([body_mask(a, body_threshold) for a in arrays], axis=0)
    return np.any([a > threshold for a in arrays], axis=0)
