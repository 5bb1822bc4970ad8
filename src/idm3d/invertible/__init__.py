"""Invertible building blocks and the memory-saving autograd; nothing here knows about diffusion."""

from __future__ import annotations

from idm3d.invertible.attention import InvertibleAttention3d, invertible_attention
from idm3d.invertible.attention_channel import ChannelAttention3d
from idm3d.invertible.attention_spatial import SpatialAttention3d
from idm3d.invertible.base import InvertibleModule, grad_parameters
from idm3d.invertible.checks import gradient_check
from idm3d.invertible.coupling import AdditiveCoupling, ConditionedConvNet
from idm3d.invertible.mode import memory_efficient_mode
from idm3d.invertible.norms import group_count
from idm3d.invertible.resampling import (
    InvertibleChannelMix3d,
    OrthogonalDownsample3d,
    OrthogonalUpsample3d,
    haar_matrix_3d,
    orthogonal_from_skew,
)
from idm3d.invertible.segment import InvertibleSequence
from idm3d.invertible.stack import Apply, ChannelMerge, ChannelSplit, StackOp

__all__ = [
    "AdditiveCoupling",
    "Apply",
    "ChannelAttention3d",
    "ChannelMerge",
    "ChannelSplit",
    "ConditionedConvNet",
    "InvertibleAttention3d",
    "InvertibleChannelMix3d",
    "InvertibleModule",
    "InvertibleSequence",
    "OrthogonalDownsample3d",
    "OrthogonalUpsample3d",
    "SpatialAttention3d",
    "StackOp",
    "grad_parameters",
    "gradient_check",
    "group_count",
    "haar_matrix_3d",
    "invertible_attention",
    "memory_efficient_mode",
    "orthogonal_from_skew",
]
