"""The training engine: DDPM training of the configured denoiser with crash-safe, resumable checkpoints.

Reproducibility: everything random in step ``i`` (which patches, the noise, the timesteps, dropout) is
drawn from generators seeded by ``(train.seed, i)``, never from state carried across steps. A run resumed
from the checkpoint at step ``n`` therefore sees exactly the batches an uninterrupted run sees from ``n``
on, and, with the weights, EMA and optimizer state restored bit for bit, produces the same losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from torch import Tensor
from tqdm.auto import tqdm

from idm3d.diffusion.schedule import build_scheduler, diffusion_loss, sample_timesteps, training_target
from idm3d.errors import CheckpointError, ConfigError, IDM3DError, NonFiniteError
from idm3d.training import run as runlib
from idm3d.training.checkpoint import (
    finite_or_none,
    latest_checkpoint,
    load_checkpoint,
    load_state_strict,
    optimizer_from_flat,
    optimizer_to_flat,
    remove_stale_files,
    save_checkpoint,
)
from idm3d.training.config import Config, config_to_dict
from idm3d.training.data_source import TrainingData, build_training_data
from idm3d.training.ema import EMA
from idm3d.training.guards import diagnose_nonfinite
from idm3d.training.logs import MetricsLog, memory_mb, plot_loss_curve
from idm3d.training.model_factory import architecture_signature, build_model, model_channels
from idm3d.training.run import resolve_device

__all__ = ["StepResult", "Trainer", "resolve_device", "step_seed", "train"]

# Independent random streams of one step.
_STREAM_NOISE, _STREAM_TORCH, _STREAM_INIT = 1, 2, 3


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, step, stream)``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, step, stream]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


@dataclasses.dataclass
class StepResult:
    """Outcome of one optimisation step (``skipped`` when loss or gradients were non-finite)."""

    loss: float
    grad_norm: float
    skipped: bool


class Trainer:
    """Owns the model, EMA, optimizer, data and run folder of one training run.

    Args:
        cfg: the run configuration.
        run_dir: the run folder (created).
        resume: continue from the newest checkpoint in ``run_dir``; otherwise ``run_dir`` must not
            already hold checkpoints.
        data: training data; built from ``cfg.data`` (with the dataset checks) when ``None``.
    """

    def __init__(
        self, cfg: Config, run_dir: str | Path, resume: bool = False, data: TrainingData | None = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / runlib.CHECKPOINTS
        existing = latest_checkpoint(self.ckpt_dir)
        if existing is not None and not resume:
            raise ConfigError(f"--out {self.run_dir}: holds checkpoints already; pass --resume or choose a new folder")
        if resume and existing is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device)
        in_ch, out_ch = model_channels(cfg.data)
        torch.manual_seed(step_seed(cfg.train.seed, 0, _STREAM_INIT))  # same seed, same initial weights
        self.model = build_model(cfg.model, in_ch, out_ch).to(self.device)  # before the (slow) data
        self.data = data if data is not None else build_training_data(cfg, self.run_dir)
        self.signature = architecture_signature(self.model, cfg.model)
        self.scheduler = build_scheduler(cfg.diffusion, "ddpm")
        self.inferer = DiffusionInferer(self.scheduler)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.step = 0
        self.elapsed = 0.0
        self.nonfinite_streak = 0
        self.skipped_total = 0
        self.last_loss: float | None = None
        self.on_step: list[Callable[[Trainer, StepResult], None]] = []
        self._saved_step: int | None = None
        if resume:
            removed = remove_stale_files(self.ckpt_dir)
            self._load(existing)
            self._saved_step = self.step
            note = f" (removed {len(removed)} incomplete file(s))" if removed else ""
            tqdm.write(f"idm3d: resuming from {existing.name} at step {self.step}{note}", file=sys.stderr)
        runlib.write_run_info(self.run_dir, cfg, self.signature)
        self.log = MetricsLog(self.run_dir / runlib.METRICS, resume_step=self.step if resume else None)

    # ------------------------------------------------------------------------------------ state

    def _load(self, path: Path) -> None:
        tensors, state = load_checkpoint(path, expected_signature=self.signature, device="cpu")
        load_state_strict(self.model, tensors, "model/", path)
        ema_tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
        try:
            self.ema.load_state_dict(ema_tensors, int(state.get("ema_updates", 0)))
        except KeyError as err:
            raise CheckpointError(f"{path}: EMA weights do not fit the model ({err})") from None
        # Left on CPU: Optimizer.load_state_dict moves moments to their parameter's device and keeps
        # "step" where the optimizer wants it.
        optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
        try:
            optimizer_from_flat(self.optimizer, optim, state["optimizer"])
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit the model ({err})") from None
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.skipped_total = int(state.get("skipped_total", 0))
        if int(state.get("seed", self.cfg.train.seed)) != self.cfg.train.seed:
            raise ConfigError(
                f"train.seed: {self.cfg.train.seed} differs from the checkpoint's {state.get('seed')} "
                "(the data order would change); keep the seed when resuming"
            )

    def save(self) -> Path:
        """Write a checkpoint at the current step (keeps the newest ``train.keep_checkpoints``)."""
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer)
        tensors: dict[str, Tensor] = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        tensors.update(opt_tensors)
        state = {
            "seed": self.cfg.train.seed,
            "rng": "per-step generators seeded from (seed, step); no RNG state carried",
            "config": config_to_dict(self.cfg),
            "signature": self.signature,
            "optimizer": opt_meta,
            "ema_updates": self.ema.num_updates,
            "elapsed_s": self.elapsed,
            "skipped_total": self.skipped_total,
            "last_loss": finite_or_none(self.last_loss) if self.last_loss is not None else None,
            "versions": runlib.versions(),
        }
        path = save_checkpoint(self.ckpt_dir, self.step, tensors, state, keep=self.cfg.train.keep_checkpoints)
        self._saved_step = self.step
        return path

    # ------------------------------------------------------------------------------------ one step

    def _autocast(self) -> contextlib.AbstractContextManager:
        # bf16 only: it has float32's range, so no loss scaling (which would hide NaN/Inf steps) is needed.
        if self.cfg.train.autocast == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _inputs(self, step: int) -> dict[str, Tensor | None]:
        target, source = self.data.batch(step)
        gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, step, _STREAM_NOISE))
        noise = torch.randn(target.shape, generator=gen)
        timesteps = sample_timesteps(self.scheduler, target.shape[0], gen)
        dev = self.device
        return {
            "target": target.to(dev),
            "source": None if source is None else source.to(dev),
            "noise": noise.to(dev),
            "timesteps": timesteps.to(dev),
        }

    def _forward(self, b: dict[str, Tensor | None]) -> Tensor:
        with self._autocast():
            if b["source"] is None:
                return self.inferer(b["target"], self.model, b["noise"], b["timesteps"])
            return self.inferer(
                b["target"], self.model, b["noise"], b["timesteps"], condition=b["source"], mode="concat"
            )

    def _loss(self, b: dict[str, Tensor | None], prediction: Tensor) -> Tensor:
        target = training_target(self.scheduler, b["target"], b["noise"], b["timesteps"],
                                 self.cfg.diffusion.prediction_type)
        return diffusion_loss(prediction, target, self.cfg.diffusion.loss)

    def train_step(self, step: int, batch: dict[str, Tensor | None] | None = None) -> StepResult:
        """Run optimisation step ``step`` (0-based); non-finite loss or gradients skip the update."""
        b = batch if batch is not None else self._inputs(step)
        tc = self.cfg.train
        torch.manual_seed(step_seed(tc.seed, step, _STREAM_TORCH))  # dropout etc.
        lr = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(b, self._forward(b))
        loss_value = float(loss.detach())
        if not np.isfinite(loss_value):
            return StepResult(loss_value, float("nan"), True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = tc.grad_clip if tc.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not np.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, grad_norm, True)
        self.optimizer.step()
        self.ema.update(self.model)
        return StepResult(loss_value, grad_norm, False)

    def _diagnose(self, step: int) -> str:
        b = self._inputs(step)
        torch.manual_seed(step_seed(self.cfg.train.seed, step, _STREAM_TORCH))

        def loss_and_backward() -> None:
            self._loss(b, self._forward(b)).backward()

        return diagnose_nonfinite(self.model, b, lambda: self._forward(b), loss_and_backward)

    def _drift_check(self, step: int) -> dict[str, float] | None:
        check = getattr(self.model, "reconstruction_error", None)
        if check is None:
            return None
        b = self._inputs(step)
        x_t = self.scheduler.add_noise(b["target"], b["noise"], b["timesteps"])
        x_in = x_t if b["source"] is None else torch.cat([x_t, b["source"]], dim=1)
        errors = {k: float(v) for k, v in check(x_in, b["timesteps"], None).items()}
        worst = max(errors, key=errors.get) if errors else None
        if worst is not None and not errors[worst] <= self.cfg.train.drift_threshold:
            msg = (f"reconstruction drift at step {step + 1}: segment {worst} rebuilds its input with max abs error "
                   f"{errors[worst]:.3g} > train.drift_threshold {self.cfg.train.drift_threshold:g}")
            if self.cfg.train.drift_action == "stop":
                raise IDM3DError(msg)
            tqdm.write(f"idm3d: warning: {msg}", file=sys.stderr)
        return errors

    # ------------------------------------------------------------------------------------ loop

    def _budget_left(self, started: float, base_elapsed: float) -> bool:
        tc = self.cfg.train
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return False
        return tc.max_seconds is None or base_elapsed + (time.monotonic() - started) < tc.max_seconds

    def run(self) -> Path:
        """Train until ``train.max_steps`` and/or ``train.max_seconds``; return the run folder."""
        tc = self.cfg.train
        started = time.monotonic()
        base_elapsed = self.elapsed
        bar = tqdm(total=tc.max_steps, initial=self.step, unit="step", disable=not tc.progress, dynamic_ncols=True)
        window_start, window_steps = time.monotonic(), 0
        try:
            while self._budget_left(started, base_elapsed):
                step = self.step
                result = self.train_step(step)
                self.step = step + 1
                self.elapsed = base_elapsed + (time.monotonic() - started)
                window_steps += 1
                record: dict[str, Any] = {"step": self.step, "loss": result.loss, "grad_norm": result.grad_norm,
                                          "lr": self.optimizer.param_groups[0]["lr"]}
                if result.skipped:
                    self.nonfinite_streak += 1
                    self.skipped_total += 1
                    self.log.write({**record, "skipped": True})
                    tqdm.write(f"idm3d: warning: step {self.step}: non-finite loss/gradient, update skipped "
                               f"({self.nonfinite_streak} in a row)", file=sys.stderr)
                    if self.nonfinite_streak >= tc.nonfinite_patience:
                        raise NonFiniteError(
                            f"{self.nonfinite_streak} steps in a row (up to step {self.step}) had a non-finite loss or "
                            f"gradient (train.nonfinite_patience={tc.nonfinite_patience}); {self._diagnose(step)}"
                        )
                else:
                    self.nonfinite_streak = 0
                    self.last_loss = result.loss
                for hook in self.on_step:
                    hook(self, result)
                if tc.drift_check_every and self.step % tc.drift_check_every == 0:
                    errors = self._drift_check(step)
                    if errors:
                        record["drift_max"] = max(errors.values())
                if self.step % tc.log_every == 0 or not self._budget_left(started, base_elapsed):
                    now = time.monotonic()
                    record.update(steps_per_s=window_steps / max(now - window_start, 1e-9),
                                  mem_mb=memory_mb(self.device), elapsed_s=self.elapsed)
                    window_start, window_steps = now, 0
                    if not result.skipped:
                        self.log.write(record)
                    bar.set_postfix(loss=f"{result.loss:.4g}", mem=f"{record['mem_mb']:.0f}MiB", refresh=False)
                bar.update(1)
                if self.step % tc.checkpoint_every == 0:
                    self.save()
                    plot_loss_curve(self.log.read(), self.run_dir / runlib.LOSS_PNG)
            if self._saved_step != self.step:
                self.save()
        finally:
            bar.close()
            self.log.close()
        plot_loss_curve(self.log.read(), self.run_dir / runlib.LOSS_PNG)
        return self.run_dir


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Train a model from ``cfg`` into ``run_dir`` (a new ``runs/<task>-<time>`` folder when ``None``).

    Returns:
        The run folder, holding ``config.yaml``, ``checkpoints/``, ``metrics.jsonl`` and ``loss.png``.

    Raises:
        DataError: the dataset checks failed (every problem is listed).
        ConfigError, CheckpointError, NonFiniteError: see :class:`Trainer`.
    """
    if run_dir is None:
        if resume:
            raise ConfigError("--resume: name the run folder to resume with --out")
        run_dir = Path("runs") / f"{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Trainer(cfg, run_dir, resume=resume).run()
