"""Random-number state kept at forward and replayed when backward rebuilds a computation.

A memory-efficient segment evaluates its sub-networks again in backward. A random layer among
them (``nn.Dropout`` in training mode) must then draw what it drew in forward, or the rebuilt
input and the gradients are silently wrong. As ``torch.utils.checkpoint(preserve_rng_state=True)``
does, the CPU generator and the generators of the accelerators the tensors live on are saved
before each rebuilt computation and restored before its rebuild; :func:`forked` keeps the
caller's own random stream untouched by the replay.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import get_device_states, set_device_states

__all__ = ["RngState", "forked"]


def _accelerator(tensors: tuple[Tensor, ...]) -> tuple[str | None, list[Tensor]]:
    """The accelerator type of ``tensors`` (``None``: CPU only) and one tensor per device of it."""
    per_device: dict[torch.device, Tensor] = {}
    for t in tensors:
        if t.device.type not in ("cpu", "meta"):
            per_device.setdefault(t.device, t)
    types = {d.type for d in per_device}
    if len(types) > 1:
        raise RuntimeError(f"idm3d.invertible: tensors on several accelerator types {sorted(types)}")
    return (types.pop() if types else None), list(per_device.values())


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and those of the accelerator devices of some tensors."""

    cpu: Tensor
    device_type: str | None
    devices: list[int]
    device_states: list[Tensor]

    @classmethod
    def capture(cls, *tensors: Tensor) -> RngState:
        """The current state of the CPU generator and of the devices ``tensors`` live on."""
        device_type, representatives = _accelerator(tensors)
        devices, states = get_device_states(*representatives) if representatives else ([], [])
        return cls(torch.get_rng_state(), device_type, devices, states)

    def restore(self) -> None:
        """Make the generators draw again what they drew after :meth:`capture`."""
        torch.set_rng_state(self.cpu)
        if self.device_type is not None:
            set_device_states(self.devices, self.device_states, device_type=self.device_type)


@contextmanager
def forked(*tensors: Tensor) -> Iterator[None]:
    """Run the block on a fork of the generators of ``tensors``' devices (and the CPU's); restore them after."""
    device_type, representatives = _accelerator(tensors)
    devices = [t.get_device() for t in representatives]
    with torch.random.fork_rng(devices=devices, device_type=device_type or "cpu"):
        yield
