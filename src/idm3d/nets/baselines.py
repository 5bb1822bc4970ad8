"""The baselines we measure against, defined once: MONAI's ``DiffusionModelUNet`` recipe (plain and
with activation checkpointing) and PatchDDM-3D's network (:mod:`idm3d.nets.patchddm`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn
from torch.utils.checkpoint import checkpoint

from idm3d.errors import ConfigError

__all__ = [
    "MONAI_BASE_CHANNELS",
    "MONAI_CHECKPOINTED_BLOCKS",
    "checkpoint_blocks",
    "count_parameters",
    "monai_channels_matching",
    "monai_kwargs",
    "monai_unet",
]

MONAI_BASE_CHANNELS = (32, 64, 64, 64)
_MONAI_GROUPS = 32  # MONAI's GroupNorm default: every width must be a multiple of it
# The blocks a MONAI user wraps in ``torch.utils.checkpoint`` when short of memory.
MONAI_CHECKPOINTED_BLOCKS = ("down_blocks", "middle_block", "up_blocks")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def monai_kwargs(channels: tuple[int, ...] = MONAI_BASE_CHANNELS, in_channels: int = 1, out_channels: int = 1) -> dict:
    """MONAI's 3D diffusion U-Net as its tutorials configure it, attention at the lowest level."""
    kwargs: dict[str, Any] = {
        "spatial_dims": 3,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "channels": tuple(channels),
        "attention_levels": (False,) * (len(channels) - 1) + (True,),
        "num_res_blocks": 2,
        "num_head_channels": 32,
        # SDPA rather than a materialised attention matrix: the fair, memory-lean MONAI setting.
        "use_flash_attention": True,
    }
    return kwargs


class _Recomputed:
    """A module's bound ``forward`` run under ``torch.utils.checkpoint`` whenever grad is on."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def checkpoint_blocks(net: nn.Module, names: tuple[str, ...] = MONAI_CHECKPOINTED_BLOCKS) -> nn.Module:
    """Recompute every block of ``net.<name>`` (a module list or one module) in backward.

    The blocks' ``forward`` is replaced on the instances, so parameters, state-dict keys and the
    call signature stay those of the plain network (its checkpoints load unchanged).
    """
    for name in names:
        target = getattr(net, name, None)
        if not isinstance(target, nn.Module):
            raise ValueError(f"checkpoint_blocks: {type(net).__name__} has no module {name!r}")
        blocks = list(target) if isinstance(target, nn.ModuleList) else [target]
        for block in blocks:
            if not isinstance(block.forward, _Recomputed):
                block.forward = _Recomputed(block.forward)  # type: ignore[method-assign]
    return net


def monai_unet(
    channels: tuple[int, ...] = MONAI_BASE_CHANNELS,
    in_channels: int = 1,
    out_channels: int = 1,
    checkpointed: bool = False,
) -> nn.Module:
    """MONAI's ``DiffusionModelUNet`` (:func:`monai_kwargs`); ``checkpointed``: every down,
    middle and up block recomputed in backward (:func:`checkpoint_blocks`)."""
    net = DiffusionModelUNet(**monai_kwargs(channels, in_channels, out_channels))
    return checkpoint_blocks(net) if checkpointed else net


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
