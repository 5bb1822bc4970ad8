"""The halo traffic of a depth-sharded IDMUNet step, term by term: bytes per convolution x convolutions.

Every convolution with a depth extent (kernel ``k``) sends ``k // 2`` planes of its input map,
``C_in x H_l x W_l`` values at its level ``l`` (``H_l = H / 2^l``), to each neighbouring rank per
evaluation. A memory-efficient step evaluates each twice forward (the pass and the backward's
rebuild) and once adjoint (backward), except the stem's first convolution, whose input (the noisy
volume) needs no gradient. The rows' sum is :func:`idm3d.domain.halo_bytes`, which the table prints
beside it as a check.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from idm3d.domain import halo_bytes
from idm3d.nets.idm_unet import IDMUNet

__all__ = ["halo_lines"]

_FIRST = "stem.body.0"  # the stem's first convolution: its input needs no gradient, so no adjoint halo


def _terms(net: IDMUNet) -> Counter[tuple[int, int, int, int]]:
    """``(level, C_in, planes per neighbour, evaluations) -> convolutions`` of ``net``'s depth-extent convs."""
    terms: Counter[tuple[int, int, int, int]] = Counter()
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv3d) and module.kernel_size[0] > 1:
            parts = name.split(".")
            # a core op's level is in its name (``down1.coupling0``); stem and head work at level 0
            level = int(re.sub(r"\D", "", net.op_names[int(parts[2])].split(".")[0])) if parts[0] == "core" else 0
            terms[(level, module.in_channels, module.kernel_size[0] // 2, 2 if name == _FIRST else 3)] += 1
    return terms


def halo_lines(size: int) -> list[str]:
    """Markdown: the default IDMUNet's halo bytes per step at ``size^3`` (fp32, batch 1), term by term."""
    net = IDMUNet()
    lines = [
        f"Halo traffic at {size}³ from the shapes: per convolution, planes x C_in x (H/2^l) x (W/2^l) x 4 B per "
        "neighbour per evaluation (2 forward, 1 adjoint; the stem's first convolution 2). An end rank has one "
        "neighbour, an inner rank two.",
        "",
        "| level | C_in | convolutions | MiB per plane | evaluations | MiB per neighbour per step |",
        "|---|---|---|---|---|---|",
    ]
    total = 0.0
    for (level, channels, planes, evals), count in sorted(_terms(net).items()):
        plane = channels * (size >> level) ** 2 * 4 / 2**20
        per_neighbour = count * planes * plane * evals
        total += per_neighbour
        lines.append(f"| {level} | {channels} | {count} | {plane:.3f} | {evals} | {per_neighbour:.2f} |")
    shape = (1, 1, size, size, size)
    stated = halo_bytes(net, shape, 3, 1, torch.float32, forward_passes=2, input_grad=False) / 2**20 / 2
    lines += ["", f"Sum: {total:.2f} MiB per neighbour per step (`idm3d.domain.halo_bytes`: {stated:.2f}); an inner "
              f"rank sends {2 * total:.2f} MiB, an end rank {total:.2f} MiB."]
    return lines
