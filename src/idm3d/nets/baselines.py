"""The standard 3D U-Net we measure against: MONAI's ``DiffusionModelUNet``."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from idm3d.errors import ConfigError

__all__ = ["MONAI_BASE_CHANNELS", "count_parameters", "monai_channels_matching", "monai_kwargs", "monai_unet"]

MONAI_BASE_CHANNELS = (32, 64, 64, 64)
_MONAI_GROUPS = 32  # MONAI's GroupNorm default: every width must be a multiple of it


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def monai_kwargs(channels: tuple[int, ...] = MONAI_BASE_CHANNELS, in_channels: int = 1, out_channels: int = 1) -> dict:
    """MONAI's 3D diffusion U-Net as its tutorials configure it, attention at the lowest level."""
    kwargs: dict[str, Any] = {
        "spatial_dims": 3,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": tuple(channels),
        "attention_levels": (False, False, False, True),
        "num_res_blocks": 2,
        "num_head_channels": 32,
        # SDPA rather than a materialised attention matrix: the fair, memory-lean MONAI setting.
        "use_flash_attention": True,
    }
    return kwargs


def monai_unet(
    channels: tuple[int, ...] = MONAI_BASE_CHANNELS, in_channels: int = 1, out_channels: int = 1
) -> nn.Module:
    return DiffusionModelUNet(**monai_kwargs(channels, in_channels, out_channels))


def _monai_parameters(channels: tuple[int, ...]) -> int:
    with torch.device("meta"):  # counting only: no memory, no initialisation cost
        return count_parameters(monai_unet(channels))


def monai_channels_matching(target: int | None) -> tuple[tuple[int, ...], int]:
    """The smallest widening of ``MONAI_BASE_CHANNELS`` (in steps of 32, non-decreasing) with at
    least ``target`` parameters, so MONAI is never the smaller model.

    Returns:
        ``(channels, parameters)``; the base channels when ``target`` is ``None``.
    """
    base_params = _monai_parameters(MONAI_BASE_CHANNELS)
    if target is None or base_params >= target:
        return MONAI_BASE_CHANNELS, base_params
    for steps in (2, 4, 8, 16):
        best: tuple[int, tuple[int, ...]] | None = None
        for ks in itertools.product(range(steps + 1), repeat=len(MONAI_BASE_CHANNELS)):
            channels = tuple(c + _MONAI_GROUPS * k for c, k in zip(MONAI_BASE_CHANNELS, ks))
            if any(a > b for a, b in itertools.pairwise(channels)):
                continue
            params = _monai_parameters(channels)
            if params >= target and (best is None or params < best[0]):
                best = (params, channels)
        if best is not None:
            return best[1], best[0]
    raise ConfigError(f"cannot widen MONAI's DiffusionModelUNet to {target} parameters")  # pragma: no cover
