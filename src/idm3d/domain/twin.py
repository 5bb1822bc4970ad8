"""A sharded twin of a model that shares its parameters, with DDP-like gradient summing.

Training keeps the unsharded model for everything that sees whole volumes or runs on one rank (the
EMA, checkpoints, previews, the non-finite diagnosis) and trains through the twin: the same
``Parameter`` objects in depth-sharded layers. After a backward through the twin, a callback queued
on autograd's engine (as DDP queues its own) sums the parameters' partial gradients over the domain
once, so the optimizer sees every rank's full, equal gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from idm3d.domain.shard import shard, sync_gradients

__all__ = ["sharded_twin", "shared_copy"]


class _GradientSum:
    """Arms on a graph-building forward of the twin; the first gradient of its backward queues one sum."""

    def __init__(self, twin: nn.Module, source: nn.Module, group: Any, average: bool) -> None:
        self.twin, self.group, self.average = twin, group, average
        self.source = [source]  # a list: not registered as a submodule of the twin
        self.armed = self.queued = False
        twin.register_forward_pre_hook(self._arm)
        for p in twin.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_gradient)

    def _arm(self, module: nn.Module, args: Any) -> None:
        if module.training != self.source[0].training:  # model.train() / eval() apply to the twin too
            module.train(self.source[0].training)
        if torch.is_grad_enabled():
            self.armed = True

    def _on_gradient(self, param: torch.Tensor) -> None:
        # a backward through the unsharded model (same parameters) is not armed and sums nothing
        if self.armed and not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _finish(self) -> None:
        self.armed = self.queued = False
        sync_gradients(self.twin, self.group, average=self.average)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers *are* ``model``'s (the same objects)."""
    twin = copy.deepcopy(model)
    originals = dict(model.named_modules())
    for name, module in twin.named_modules():
        source = originals[name]
        for key in module._parameters:
            module._parameters[key] = source._parameters[key]
        for key in module._buffers:
            module._buffers[key] = source._buffers[key]
    return twin


def sharded_twin(model: nn.Module, group: Any = None, average: bool = True) -> nn.Module:
    """A depth-sharded copy of ``model`` whose parameters and buffers *are* ``model``'s.

    Args:
        model: the unsharded model (the optimizer's, the EMA's, the checkpoint's).
        group: the domain's process group (``None``: the world).
        average: sum the gradients over ranks and divide by their number (each rank's loss being the
            mean over its slices, as the training loss is); ``False``: the plain sum.
    """
    twin = shard(shared_copy(model), group)
    twin._gradient_sum = _GradientSum(twin, model, group, average)  # kept alive with the twin
    return twin
