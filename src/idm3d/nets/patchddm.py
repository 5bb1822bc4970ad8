"""PatchDDM-3D's training network, the baseline of the IDM paper, rebuilt from MONAI blocks.

Bieder et al., "Memory-Efficient 3D Denoising Diffusion Models for Medical Image Processing"
(MIDL 2023) train a guided-diffusion U-Net on patches. Its published ``run.sh`` configures:
29 base channels, channel multipliers ``1,3,4,4,4,4,4``, two residual blocks per level, no
attention (not even at the bottleneck), additive skips ``(h + skip) / 2`` instead of
concatenation, GroupNorm with 29 groups, stride-2 convolutions down, nearest-neighbour + 3x3x3
convolution up, one output channel and 8 input channels (4 MR modalities, 3 patch coordinates and
the noisy target). The encoder keeps every block's output as a skip; the decoder has one block
more per level than the encoder (guided diffusion's layout), each block ending on the width of the
skip it is added to next. ``checkpoint=True`` is its gradient checkpointing: every residual block
is recomputed in backward. This file is written from that description (not copied); with the
defaults it has 24,260,299 parameters (the paper reports 24.26 M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute

__all__ = ["PatchDDMUNet"]


class _Up(nn.Module):
    """Nearest-neighbour x2, then a 3x3x3 convolution (guided diffusion's ``Upsample``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class PatchDDMUNet(nn.Module):
    """PatchDDM-3D's U-Net (``run.sh`` settings), called as ``net(x, timesteps)`` like the others.

    Args:
        in_channels: input channels (8 in PatchDDM-3D: 4 modalities, 3 coordinates, noisy target).
        out_channels: predicted channels.
        channels: base width (``model_channels``).
        channel_mult: width multiplier per level; ``len - 1`` downsamplings.
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        norm_num_groups: GroupNorm groups; must divide every level's width.
        checkpoint: recompute every residual block in backward (PatchDDM-3D's ``use_checkpoint``).
    """

    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 1,
        channels: int = 29,
        channel_mult: Sequence[int] = (1, 3, 4, 4, 4, 4, 4),
        num_res_blocks: int = 2,
        norm_num_groups: int = 29,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        if channels < 1 or num_res_blocks < 1 or not widths or min(widths) < 1:
            raise ValueError(
                f"PatchDDMUNet: channels, num_res_blocks and channel_mult must be positive, "
                f"got {channels}, {num_res_blocks}, {tuple(channel_mult)}"
            )
        if any(w % norm_num_groups for w in widths):
            raise ValueError(f"PatchDDMUNet: norm_num_groups={norm_num_groups} must divide every width {widths}")
        self.in_channels, self.out_channels, self.channels = in_channels, out_channels, channels
        self.levels = len(widths)
        self.checkpoint = checkpoint
        emb = 4 * channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))

        def block(cin: int, cout: int) -> DiffusionUNetResnetBlock:
            return DiffusionUNetResnetBlock(3, cin, emb, cout, norm_num_groups=norm_num_groups, norm_eps=1e-5)

        self.conv_in = nn.Conv3d(in_channels, channels, 3, padding=1)
        # Encoder: ``("res", module)`` or ``("down", module)``; every output is a skip.
        self.encoder = nn.ModuleList()
        skip_widths, width = [channels], channels
        for level, out in enumerate(widths):
            for _ in range(num_res_blocks):
                self.encoder.append(block(width, out))
                width = out
                skip_widths.append(width)
            if level < self.levels - 1:
                self.encoder.append(nn.Conv3d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        self.middle = nn.ModuleList([block(width, width), block(width, width)])
        # Decoder: each block takes (h + skip) / 2 and ends on the width of the next skip.
        self.decoder = nn.ModuleList()
        self.upsample = nn.ModuleList()  # after each decoder block: ``_Up`` or identity
        for level in reversed(range(self.levels)):
            for i in range(num_res_blocks + 1):
                skip_widths.pop()
                out = skip_widths[-1] if skip_widths else channels
                self.decoder.append(block(width, out))
                width = out
                self.upsample.append(_Up(width) if level and i == num_res_blocks else nn.Identity())
        self.out = nn.Sequential(
            nn.GroupNorm(norm_num_groups, width), nn.SiLU(), nn.Conv3d(width, out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)  # guided diffusion's zero_module: start at "predict 0"
        nn.init.zeros_(self.out[-1].bias)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (``2 ** (levels - 1)``; 64 by default)."""
        return 2 ** (self.levels - 1)

    def _res(self, module: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return recompute(module, h, emb, use_reentrant=False)
        return module(h, emb)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None) -> Tensor:
        """Predict for ``x`` ``(B, in_channels, D, H, W)`` at ``timesteps`` ``(B,)``; ``context`` unused."""
        if context is not None:
            raise ValueError("PatchDDMUNet: takes no context (PatchDDM-3D conditions by input channels)")
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"PatchDDMUNet: expected (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(
                f"PatchDDMUNet: spatial sizes must be multiples of {self.size_multiple}, got {tuple(x.shape[2:])}"
            )
        t = timesteps.to(x.device).reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(get_timestep_embedding(t.to(x.device), self.channels).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for module in self.encoder:
            h = self._res(module, h, emb) if isinstance(module, DiffusionUNetResnetBlock) else module(h)
            skips.append(h)
        for module in self.middle:
            h = self._res(module, h, emb)
        for module, up in zip(self.decoder, self.upsample):
            h = up(self._res(module, (h + skips.pop()) / 2, emb))
        return self.out(h)
