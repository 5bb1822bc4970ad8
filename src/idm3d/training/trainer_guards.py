"""The trainer's guards around each step: skipped non-finite steps (with a diagnosis) and the drift check.

A mixin of :class:`~idm3d.training.trainer.Trainer`, kept apart from the step and the loop; the checks
themselves (which module went non-finite, the drift verdict) are in :mod:`idm3d.training.guards`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from idm3d.errors import IDM3DError, NonFiniteError
from idm3d.runs.config import Config
from idm3d.training.guards import diagnose_nonfinite, drift_fields, drift_verdict
from idm3d.training.steps import STREAM_TORCH, StepResult, step_seed

__all__ = ["TrainerGuards"]


class TrainerGuards:
    """The guard methods of :class:`~idm3d.training.trainer.Trainer`, which sets the attributes below."""

    cfg: Config
    dist: Any
    model: torch.nn.Module
    pipeline: Any
    scaler: Any
    log: Any
    step: int
    nonfinite_streak: int
    skipped_total: int
    last_loss: float | None
    _first_step: int
    _inputs: Callable[[int], dict[str, Tensor | None]]
    _record: Callable[[StepResult], dict[str, Any]]

    def _diagnose(self, step: int) -> str:
        b = self._inputs(step)
        torch.manual_seed(step_seed(self.cfg.train.seed, step, STREAM_TORCH))

        def loss_and_backward() -> Tensor:
            loss = self.pipeline.loss(b, self.model)
            loss.backward()
            return loss

        message = diagnose_nonfinite(self.model, b, lambda: self.pipeline.forward(b, self.model), loss_and_backward)
        found = self.dist.gather(message)  # each process diagnosed its own share of the batch
        if len(set(found)) > 1:
            message = "; ".join(f"process {rank}: {m}" for rank, m in enumerate(found))
        return message

    def _guard_nonfinite(self, step: int, result: StepResult) -> None:
        """Count skipped steps; stop with a diagnosis after ``train.nonfinite_patience`` in a row."""
        if not result.skipped:
            self.nonfinite_streak = 0
            self.last_loss = result.loss
            return
        # An fp16 overflow at a loss scale > 1 is the scaler probing its range, not a fault.
        self.nonfinite_streak += 0 if result.overflow else 1
        self.skipped_total += 1
        record = {**self._record(result), "skipped": True, **({"overflow": True} if result.overflow else {})}
        self.log.write(record)
        if self.dist.is_main and result.overflow:
            tqdm.write(f"idm3d: warning: step {self.step}: fp16 gradient overflow, update skipped "
                       f"(loss scale lowered to {self.scaler.get_scale():g})", file=sys.stderr)
        elif self.dist.is_main:
            tqdm.write(f"idm3d: warning: step {self.step}: non-finite loss/gradient, update skipped "
                       f"({self.nonfinite_streak} in a row)", file=sys.stderr)
        patience = self.cfg.train.nonfinite_patience
        if self.nonfinite_streak >= patience:
            raise NonFiniteError(
                f"{self.nonfinite_streak} steps in a row (up to step {self.step}) had a non-finite loss or "
                f"gradient (train.nonfinite_patience={patience}); {self._diagnose(step)}"
            )

    def _drift_check(self, step: int) -> dict[str, float] | None:
        check = getattr(self.model, "reconstruction_error", None)
        if check is None:
            return None
        b = self._inputs(step)
        errors = {k: float(v) for k, v in check(self.pipeline.noisy_input(b), b["timesteps"], None).items()}
        if self.dist.enabled:  # each process checked its own share; all must take the same decision
            errors = dict(zip(errors, self.dist.max([v if np.isfinite(v) else float("inf") for v in errors.values()])))
        msg = drift_verdict(errors, self.cfg.train.drift_threshold, step + 1)
        if msg is not None:
            if self.cfg.train.drift_action == "stop":
                self.log.write({"step": step + 1, **drift_fields(errors), "drift_stop": True})
                raise IDM3DError(msg)
            if self.dist.is_main:
                tqdm.write(f"idm3d: warning: {msg}", file=sys.stderr)
        return errors

    def _guard_drift(self, step: int, record: dict[str, Any]) -> None:
        """After the run's first step and every ``train.drift_check_every`` steps: the core's rebuild errors.

        The first step is checked too, so a broken inverse shows at once, not ``drift_check_every`` steps on.
        """
        every = self.cfg.train.drift_check_every
        if every and (self.step % every == 0 or step == self._first_step):
            errors = self._drift_check(step)
            if errors:
                record.update(drift_fields(errors))
