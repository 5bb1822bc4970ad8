"""The non-invertible ends of the denoiser: the only layers that store activations.

The stem lifts the 1-4 input channels to the core width through a growing, nonlinear channel
schedule (``in -> width/2 -> width``); the head projects the core output back. With
``bookends=False`` (the ablation of the IDM paper) both become a single linear 1x1x1 convolution,
so the core sees a linear lift of the input and its output is linearly projected.
"""

from __future__ import annotations

from torch import Tensor, nn

from idm3d.invertible.mode import lean_graph
from idm3d.invertible.norm_act import group_norm_silu
from idm3d.invertible.norms import group_count
from idm3d.invertible.slab_conv import SlabConv3d

__all__ = ["Head", "Stem"]


class Stem(nn.Module):
    """``(B, in, ...) -> (B, width, ...)``.

    Args:
        in_channels: input channels (noisy target plus any source modalities).
        width: channels of the invertible core at full resolution.
        nonlinear: ``Conv3-GN-SiLU-Conv3`` with a ``width/2`` middle (``True``), or one linear
            1x1x1 convolution (``False``).
    """

    def __init__(self, in_channels: int, width: int, nonlinear: bool = True) -> None:
        super().__init__()
        if nonlinear:
            mid = max(width // 2, 1)
            self.body = nn.Sequential(
                SlabConv3d(in_channels, mid, 3, bias=False),  # GroupNorm follows; depth slabs at large sizes
                nn.GroupNorm(group_count(mid), mid),
                nn.SiLU(),
                SlabConv3d(mid, width, 3),
            )
        else:
            self.body = nn.Conv3d(in_channels, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        # memory-efficient mode: GroupNorm-SiLU as one lean node, last convolution channels-last
        if lean_graph() and isinstance(self.body, nn.Sequential):
            conv1, norm, _, conv2 = self.body
            return conv2(group_norm_silu(conv1(x), norm, channels_last=True)).contiguous()
        return self.body(x)


class Head(nn.Module):
    """``(B, width, ...) -> (B, out, ...)``: GroupNorm-SiLU-Conv3, zero-initialised as MONAI's output block.

    Args:
        width: channels of the core output.
        out_channels: channels of the prediction.
        nonlinear: the ``GN-SiLU-Conv3`` block (``True``) or one linear 1x1x1 convolution (``False``).
    """

    def __init__(self, width: int, out_channels: int, nonlinear: bool = True) -> None:
        super().__init__()
        if nonlinear:
            conv = SlabConv3d(width, out_channels, 3)
            self.body = nn.Sequential(nn.GroupNorm(group_count(width), width), nn.SiLU(), conv)
        else:
            conv = nn.Conv3d(width, out_channels, 1)
            self.body = conv
        # the first prediction is 0: training starts from "predict the mean"
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        # memory-efficient mode: GroupNorm-SiLU as one lean node, convolution channels-last
        if lean_graph() and isinstance(self.body, nn.Sequential):
            norm, _, conv = self.body
            return conv(group_norm_silu(x, norm, channels_last=True)).contiguous()
        return self.body(x)
