"""The standard 3D U-Net we measure against: MONAI's ``DiffusionModelUNet``."""

from __future__ import annotations

from monai.networks.nets import DiffusionModelUNet
from torch import nn

__all__ = ["count_parameters", "monai_unet", "monai_unet_at_least"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def monai_unet(in_channels: int = 1, out_channels: int = 1, scale: float = 1.0) -> DiffusionModelUNet:
    """MONAI's 3D diffusion U-Net: channels (32, 64, 64, 64) x ``scale``, attention at the lowest level.

    Channel counts are rounded to multiples of 16 (GroupNorm with 16 groups, 8-channel heads).
    """
    channels = tuple(max(16, round(c * scale / 16) * 16) for c in (32, 64, 64, 64))
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        attention_levels=(False, False, False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=16,
    )


def monai_unet_at_least(parameters: int, in_channels: int = 1, out_channels: int = 1) -> DiffusionModelUNet:
    """The smallest :func:`monai_unet` (by channel scale) with at least ``parameters`` parameters."""
    scale = 1.0
    while True:
        net = monai_unet(in_channels, out_channels, scale)
        if count_parameters(net) >= parameters:
            return net
        scale *= 1.15
