"""Denoisers: the invertible IDMUNet, its bookends, and the MONAI baseline."""

from __future__ import annotations

from idm3d.nets.idm_unet import IDMUNet

__all__ = ["IDMUNet"]
