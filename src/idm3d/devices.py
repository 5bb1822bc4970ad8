"""Device names to torch devices: the one definition every command uses (``auto``, ``cpu``, ``cuda[:N]``)."""

from __future__ import annotations

import torch

from idm3d.errors import ArgumentError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must be a valid, available torch device.

    Raises:
        ArgumentError: (``argument`` ``device``) not a device name, or CUDA asked for on a machine without
            it. Callers that read the name from an option name the option with ``err.detail``
            (``train.device: ...``).
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ArgumentError("device", f"expected auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", f"{name!r} requested but CUDA is not available (torch {torch.__version__})")
    return device
