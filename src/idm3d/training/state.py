"""The tensors of a training checkpoint: model, EMA and optimizer in one flat dict, and back.

The checkpoint's JSON half is a :class:`~idm3d.runs.checkpoint.TrainState`; this module moves the
tensors between the training objects and the flat ``model/...``, ``ema/...``, ``optim/...`` names that
:func:`~idm3d.runs.checkpoint.save_checkpoint` writes to safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from idm3d.errors import CheckpointError
from idm3d.runs.checkpoint import TrainState, load_state_strict, optimizer_from_flat, optimizer_to_flat
from idm3d.training.ema import EMA

__all__ = ["restore_tensors", "training_tensors"]


def training_tensors(model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Every tensor a checkpoint stores: ``model/<name>``, ``ema/<name>``, ``optim/<param>/<name>``."""
    tensors: dict[str, Tensor] = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in ema.state_dict().items()})
    tensors.update(optimizer_to_flat(optimizer)[0])
    return tensors


def restore_tensors(
    path: Path,
    tensors: Mapping[str, Tensor],
    state: TrainState,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Load a checkpoint's tensors (and the scaler's state) into the training objects; any misfit names ``path``."""
    load_state_strict(model, tensors, "model/", path)
    try:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}, state.ema_updates)
    except KeyError as err:
        raise CheckpointError(f"{path}: EMA weights do not fit the model ({err})") from None
    # Left on CPU: Optimizer.load_state_dict moves moments to their parameter's device and keeps "step"
    # where the optimizer wants it.
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    try:
        optimizer_from_flat(optimizer, optim, state.optimizer or {})
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{path}: optimizer state does not fit the model ({err})") from None
    if scaler is not None and isinstance(state.grad_scaler, dict):
        try:
            scaler.load_state_dict(state.grad_scaler)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{path}: fp16 loss-scaler state is unreadable ({err})") from None
