"""idm3d: 3D diffusion models on medical volumes with a memory-saving invertible denoiser."""

from __future__ import annotations

from idm3d.nets.idm_unet import IDMUNet

__version__ = "0.1.0"

__all__ = ["IDMUNet", "__version__"]
