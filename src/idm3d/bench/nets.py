"""The networks ``idm3d bench memory``, ``max-size`` and ``profile`` compare, by name.

``idm*`` are ``IDMUNet()`` with its own defaults (one input channel); ``monai*`` is the MONAI recipe
of :mod:`idm3d.nets.baselines`, widened until it has at least IDMUNet's parameters; ``patchddm*``
is PatchDDM-3D's published network (:mod:`idm3d.nets.patchddm`) with its 8 input channels. ``-ckpt``
variants recompute every block in backward, as a user short of memory would configure them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from idm3d.errors import ConfigError
from idm3d.nets.baselines import MONAI_BASE_CHANNELS, count_parameters, monai_channels_matching, monai_unet

__all__ = [
    "BASELINES",
    "NET_LABELS",
    "ConvStack",
    "build_net",
    "in_channels",
    "parse_nets",
    "size_multiple",
    "size_parameters",
]

NET_LABELS: dict[str, str] = {
    "idm": "IDMUNet (memory-efficient)",
    "idm-plain": "IDMUNet (plain autograd)",
    "idm-nobookends": "IDMUNet (bookends=False)",
    "monai": "MONAI DiffusionModelUNet",
    "monai-ckpt": "MONAI DiffusionModelUNet, checkpointed blocks",
    "patchddm": "PatchDDM-3D",
    "patchddm-ckpt": "PatchDDM-3D, checkpointed blocks",
    "conv-stack": "8 x Conv3d(32, 32, 3) + SiLU (throughput yardstick)",
}
# What every IDMUNet row is compared with (ratios in the reports).
BASELINES = ("monai", "monai-ckpt", "patchddm", "patchddm-ckpt")


def in_channels(name: str) -> int:
    """Input channels of a network: PatchDDM-3D's published 8, the stack's 32, one for the others."""
    return 8 if name.startswith("patchddm") else 32 if name == "conv-stack" else 1


def size_multiple(name: str) -> int:
    """Cube edges must be multiples of this for the network (PatchDDM-3D downsamples six times)."""
    return 64 if name.startswith("patchddm") else 8


def build_net(name: str, monai_channels: tuple[int, ...] | list[int] | None = None) -> nn.Module:
    """Build one of ``NET_LABELS``' networks (``in_channels(name)`` inputs, one output channel)."""
    if name in ("monai", "monai-ckpt"):
        return monai_unet(tuple(monai_channels or MONAI_BASE_CHANNELS), checkpointed=name == "monai-ckpt")
    if name in ("patchddm", "patchddm-ckpt"):
        from idm3d.nets.patchddm import PatchDDMUNet

        return PatchDDMUNet(checkpoint=name == "patchddm-ckpt")
    if name == "conv-stack":
        return ConvStack()
    if name not in NET_LABELS:
        raise ConfigError(f"--nets: unknown network {name!r} (known: {', '.join(NET_LABELS)})")
    from idm3d.nets.idm_unet import IDMUNet

    if name == "idm-nobookends":
        return IDMUNet(bookends=False)
    return IDMUNet(memory_efficient=name == "idm")


def parse_nets(text: str) -> list[str]:
    """Parse ``--nets idm,monai`` (names from ``NET_LABELS``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NET_LABELS]
    if unknown or not names:
        raise ConfigError(f"--nets: expected names from {', '.join(NET_LABELS)}, got {text!r}")
    return names


def size_parameters() -> tuple[dict[str, Any], str | None]:
    """Parameter counts of the IDMUNet and the matching MONAI widths (or why IDMUNet is missing)."""
    note = None
    idm_params = None
    try:
        idm_params = count_parameters(build_net("idm"))
    except Exception as err:  # the benchmark still runs the baseline rows
        note = f"IDMUNet unavailable ({type(err).__name__}: {err}); MONAI uses its base channels"
    channels, monai_params = monai_channels_matching(idm_params)
    return {"idm_params": idm_params, "monai_channels": list(channels), "monai_params": monai_params}, note


class ConvStack(nn.Module):
    """``depth`` x (``Conv3d(width, width, 3)`` + SiLU): the machine's convolution throughput, the
    yardstick of the GFLOP/s goal (same call as the denoisers; the timesteps are ignored)."""

    def __init__(self, width: int = 32, depth: int = 8) -> None:
        super().__init__()
        self.in_channels = self.out_channels = width
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv3d(width, width, 3, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Any, timesteps: Any = None) -> Any:
        return self.body(x)
