"""idm3d: 3D diffusion models on medical volumes with a memory-saving invertible denoiser."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["IDMUNet", "__version__"]

if TYPE_CHECKING:
    from idm3d.nets.idm_unet import IDMUNet


def __getattr__(name: str) -> Any:
    # Lazy: importing idm3d.invertible or idm3d.errors should not pay for MONAI's import.
    if name == "IDMUNet":
        from idm3d.nets.idm_unet import IDMUNet

        return IDMUNet
    raise AttributeError(f"module 'idm3d' has no attribute {name!r}")
