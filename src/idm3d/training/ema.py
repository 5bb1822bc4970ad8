"""Exponential moving average of model weights (the weights sampling uses by default)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Shadow copy ``s <- d * s + (1 - d) * w`` of every floating-point tensor of a model's state dict.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early
    EMA weights are not dominated by the random initialisation. Buffers that are not floating point are
    copied as they are.

    Args:
        model: the model being trained.
        decay: the long-run decay in [0, 1]; 0 copies the weights at every update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        d = self.current_decay()
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach().to(s.dtype), 1.0 - d)
            else:
                s.copy_(v)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, tensors: dict[str, Tensor], num_updates: int) -> None:
        missing = sorted(set(self.shadow) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA tensors differ from the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for k, v in tensors.items():
            if v.shape != self.shadow[k].shape:
                raise KeyError(f"EMA tensor {k}: shape {tuple(v.shape)} != model {tuple(self.shadow[k].shape)}")
            self.shadow[k].copy_(v)
        self.num_updates = int(num_updates)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self.shadow, strict=True)
