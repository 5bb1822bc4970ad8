"""Mixed precision for training and sampling (``train.precision`` / ``sample.precision``).

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the model under ``torch.autocast``: the
sub-networks (convolutions, norms, MLPs, attention scores) compute in the low precision while the
invertible core keeps its state in float32 (coupling additions, orthogonal resampling, attention
application), so inverses stay exact up to float32 rounding; see docs/precision.md for the measurements
behind this split.

fp16 has a narrow range, so its training uses :class:`torch.amp.GradScaler` (dynamic loss scaling). The
scaler skips steps whose scaled gradients overflow and halves the scale; :func:`overflow_explained`
tells the trainer's non-finite guard whether such a skip can be blamed on the scale, so a persistent
NaN is still caught (see :class:`~idm3d.training.trainer.Trainer`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from idm3d.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "autocast",
    "autocast_dtype",
    "check_precision",
    "grad_scaler",
    "overflow_explained",
    "scaler_state",
]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``None`` for fp32)."""
    if precision not in _DTYPES:
        raise ConfigError(f"precision: expected one of {'|'.join(PRECISIONS)}, got {precision!r}")
    return _DTYPES[precision]


def check_precision(precision: str, device: torch.device, option: str = "train.precision") -> None:
    """Refuse a precision the device cannot run, with one line naming ``option`` (warn when it runs slowly)."""
    dtype = autocast_dtype(precision)
    if dtype is torch.float16 and device.type == "cpu":
        # It runs (GradScaler works on CPU too), but CPU fp16 convolutions are slow: a training step measured
        # 5-10x slower than fp32 and 9-57x slower than bf16 (docs/precision.md).
        warnings.warn(f"{option}=fp16 on CPU is slow (no fast fp16 CPU kernels); fp16 is meant for CUDA, "
                      "use bf16 or fp32 on CPU", UserWarning, stacklevel=2)
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{option}: bf16 needs a GPU with bfloat16 support ({torch.cuda.get_device_name(device)} "
                          "has none); use fp16 or fp32")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 training (CUDA or CPU); ``None`` for fp32/bf16, which have float32's range."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def overflow_explained(scaler: torch.amp.GradScaler | None, scale: float) -> bool:
    """Whether non-finite gradients at loss scale ``scale`` may be the scaler's own overflow.

    Above 1 the scale amplifies the gradients, so an overflow is the scaler probing its range: it halves
    the scale and the step is retried with the next batch. At or below 1 the scaled gradients are no
    larger than the true ones, so non-finite values are a real fault. A persistent NaN halves the scale
    on every step and so reaches 1 after ``log2(initial scale)`` (16) steps, after which each further
    non-finite step counts towards ``train.nonfinite_patience``.
    """
    return scaler is not None and scale > 1.0


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
    """The scaler's JSON-able state (``None`` without a scaler)."""
    return None if scaler is None else dict(scaler.state_dict())
