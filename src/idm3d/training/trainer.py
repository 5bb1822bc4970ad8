"""The training engine: DDPM training of the configured denoiser with crash-safe, resumable checkpoints.

Reproducibility: everything random in step ``i`` (which patches, the noise, the timesteps, dropout) is
drawn from generators seeded by ``(train.seed, i)``, never from state carried across steps. A run resumed
from the checkpoint at step ``n`` therefore sees exactly the batches an uninterrupted run sees from ``n``
on, and, with the weights, EMA and optimizer state restored bit for bit, produces the same losses.

Under torchrun every process runs a Trainer on its share of each step's global batch
(:mod:`idm3d.training.distributed`); ``train.precision`` selects fp32 or bf16/fp16 autocast
(:mod:`idm3d.training.precision`).
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
from torch import Tensor, nn
from tqdm.auto import tqdm

from idm3d.diffusion.schedule import build_scheduler, diffusion_loss, sample_timesteps, training_target
from idm3d.errors import CheckpointError, ConfigError, IDM3DError, NonFiniteError
from idm3d.training import distributed
from idm3d.training import precision as mixed
from idm3d.training import run as runlib
from idm3d.training.checkpoint import (
    checkpoint_paths,
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
    overflow: bool = False  # skipped on an fp16 gradient overflow at a loss scale > 1 (not a fault)


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
        self.dist = distributed.setup(cfg.train.device)
        self.dist.check_batch(cfg.data.batch_size)
        self.device = self.dist.device
        mixed.check_precision(cfg.train.precision, self.device)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        in_ch, out_ch = model_channels(cfg.data)
        torch.manual_seed(step_seed(cfg.train.seed, 0, _STREAM_INIT))  # same seed, same initial weights
        self.model = build_model(cfg.model, in_ch, out_ch).to(self.device)  # before the (slow) data
        self.data = data if data is not None else distributed.build_on_main_first(
            self.dist, lambda folder: build_training_data(cfg, folder), self.run_dir
        )
        self.signature = architecture_signature(self.model, cfg.model)
        self.scheduler = build_scheduler(cfg.diffusion, "ddpm")
        self.inferer = DiffusionInferer(self.scheduler)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.scaler = mixed.grad_scaler(cfg.train.precision, self.device)
        self.step = 0
        self.elapsed = 0.0
        self.nonfinite_streak = 0
        self.skipped_total = 0
        self.last_loss: float | None = None
        self.on_step: list[Callable[[Trainer, StepResult], None]] = []
        self._saved_step: int | None = None
        if resume:
            removed = remove_stale_files(self.ckpt_dir) if self.dist.is_main else []
            self._load(existing)
            self._saved_step = self.step
            note = f" (removed {len(removed)} incomplete file(s))" if removed else ""
            if self.dist.is_main:
                tqdm.write(f"idm3d: resuming from {existing.name} at step {self.step}{note}", file=sys.stderr)
        # The training forward goes through DDP when distributed; checks and diagnoses use self.model.
        self.net = self.dist.wrap(self.model)
        if self.dist.is_main:
            runlib.write_run_info(self.run_dir, cfg, self.signature)
        self.log: MetricsLog | distributed.NullLog = (
            MetricsLog(self.run_dir / runlib.METRICS, resume_step=self.step if resume else None)
            if self.dist.is_main else distributed.NullLog()
        )

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
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit the model ({err})") from None
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.skipped_total = int(state.get("skipped_total", 0))
        if self.scaler is not None and isinstance(state.get("grad_scaler"), dict):
            try:
                self.scaler.load_state_dict(state["grad_scaler"])
            except (KeyError, ValueError, TypeError, RuntimeError) as err:
                raise CheckpointError(f"{path}: fp16 loss-scaler state is unreadable ({err})") from None
        if int(state.get("seed", self.cfg.train.seed)) != self.cfg.train.seed:
            raise ConfigError(
                f"train.seed: {self.cfg.train.seed} differs from the checkpoint's {state.get('seed')} "
                "(the data order would change); keep the seed when resuming"
            )

    def save(self) -> Path:
        """Write a checkpoint at the current step (keeps the newest ``train.keep_checkpoints``)."""
        if not self.dist.is_main:  # every process holds the same state: rank 0 writes it
            self._saved_step = self.step
            return checkpoint_paths(self.ckpt_dir, self.step)[1]
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
            "precision": self.cfg.train.precision,
            "grad_scaler": mixed.scaler_state(self.scaler),
            "world_size": self.dist.world_size,
            "last_loss": finite_or_none(self.last_loss) if self.last_loss is not None else None,
            "versions": runlib.versions(),
        }
        path = save_checkpoint(self.ckpt_dir, self.step, tensors, state, keep=self.cfg.train.keep_checkpoints)
        self._saved_step = self.step
        return path

    # ------------------------------------------------------------------------------------ one step

    def _autocast(self) -> contextlib.AbstractContextManager:
        return mixed.autocast(self.cfg.train.precision, self.device)

    def _inputs(self, step: int) -> dict[str, Tensor | None]:
        target, source = self.data.batch(step)
        gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, step, _STREAM_NOISE))
        noise = torch.randn(target.shape, generator=gen)
        timesteps = sample_timesteps(self.scheduler, target.shape[0], gen)
        # Every process draws the whole global batch from (seed, step) and keeps its own share.
        share, dev = self.dist.shard, self.device
        return {
            "target": share(target).to(dev),
            "source": None if source is None else share(source).to(dev),
            "noise": share(noise).to(dev),
            "timesteps": share(timesteps).to(dev),
        }

    def _forward(self, b: dict[str, Tensor | None], module: nn.Module | None = None) -> Tensor:
        model = self.net if module is None else module
        with self._autocast():
            if b["source"] is None:
                return self.inferer(b["target"], model, b["noise"], b["timesteps"])
            return self.inferer(
                b["target"], model, b["noise"], b["timesteps"], condition=b["source"], mode="concat"
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
        # The global batch's mean loss: every process takes the same skip decision from it.
        loss_value = self.dist.mean(float(loss.detach()))
        if not np.isfinite(loss_value):
            if self.dist.enabled:
                # DDP waits for this forward's backward: running it completes the gradient reduction, so the
                # processes stay in step and a later backward through self.model (the diagnosis) stays local.
                loss.backward()
                self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, float("nan"), True)
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and check the true gradients
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = tc.grad_clip if tc.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not np.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # halves the scale
            return StepResult(loss_value, grad_norm, True, overflow=mixed.overflow_explained(self.scaler, scale))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.model)
        return StepResult(loss_value, grad_norm, False)

    def _diagnose(self, step: int) -> str:
        b = self._inputs(step)
        torch.manual_seed(step_seed(self.cfg.train.seed, step, _STREAM_TORCH))

        def loss_and_backward() -> Tensor:
            loss = self._loss(b, self._forward(b, self.model))
            loss.backward()
            return loss

        message = diagnose_nonfinite(self.model, b, lambda: self._forward(b, self.model), loss_and_backward)
        found = self.dist.gather(message)  # each process diagnosed its own share of the batch
        if len(set(found)) > 1:
            message = "; ".join(f"process {rank}: {m}" for rank, m in enumerate(found))
        return message

    def _drift_check(self, step: int) -> dict[str, float] | None:
        check = getattr(self.model, "reconstruction_error", None)
        if check is None:
            return None
        b = self._inputs(step)
        x_t = self.scheduler.add_noise(b["target"], b["noise"], b["timesteps"])
        x_in = x_t if b["source"] is None else torch.cat([x_t, b["source"]], dim=1)
        errors = {k: float(v) for k, v in check(x_in, b["timesteps"], None).items()}
        if self.dist.enabled:  # each process checked its own share; all must take the same decision
            errors = dict(zip(errors, self.dist.max([v if np.isfinite(v) else float("inf") for v in errors.values()])))
        worst = _drift_fields(errors)["drift_op"] if errors else None  # a NaN error counts as the worst
        if worst is not None and not errors[worst] <= self.cfg.train.drift_threshold:
            msg = (f"reconstruction drift at step {step + 1}: segment {worst} rebuilds its input with max abs error "
                   f"{errors[worst]:.3g} > train.drift_threshold {self.cfg.train.drift_threshold:g}")
            if self.cfg.train.drift_action == "stop":
                self.log.write({"step": step + 1, **_drift_fields(errors), "drift_stop": True})
                raise IDM3DError(msg)
            if self.dist.is_main:
                tqdm.write(f"idm3d: warning: {msg}", file=sys.stderr)
        return errors

    # ------------------------------------------------------------------------------------ loop

    def _budget_left(self, started: float, base_elapsed: float) -> bool:
        tc = self.cfg.train
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return False
        if tc.max_seconds is None:
            return True
        # Rank 0's clock decides for all: processes that disagreed would wait on each other forever.
        return self.dist.agree(base_elapsed + (time.monotonic() - started) < tc.max_seconds)

    def run(self) -> Path:
        """Train until ``train.max_steps`` and/or ``train.max_seconds``; return the run folder."""
        tc = self.cfg.train
        started = time.monotonic()
        base_elapsed = self.elapsed
        bar = tqdm(total=tc.max_steps, initial=self.step, unit="step", disable=not tc.progress or not self.dist.is_main,
                   dynamic_ncols=True)
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
                    # An fp16 overflow at a loss scale > 1 is the scaler probing its range, not a fault.
                    self.nonfinite_streak += 0 if result.overflow else 1
                    self.skipped_total += 1
                    self.log.write({**record, "skipped": True, **({"overflow": True} if result.overflow else {})})
                    if self.dist.is_main and result.overflow:
                        tqdm.write(f"idm3d: warning: step {self.step}: fp16 gradient overflow, update skipped "
                                   f"(loss scale lowered to {self.scaler.get_scale():g})", file=sys.stderr)
                    elif self.dist.is_main:
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
                        record.update(_drift_fields(errors))
                # Drift-check steps are always logged: the per-op errors are the point of the check.
                if self.step % tc.log_every == 0 or "drift" in record or not self._budget_left(started, base_elapsed):
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


def _drift_fields(errors: dict[str, float]) -> dict[str, Any]:
    """Metrics-log fields of a drift check: every op's max abs rebuild error, the worst op and its error."""
    worst = max(errors, key=lambda k: errors[k] if np.isfinite(errors[k]) else float("inf"))
    return {"drift": {k: finite_or_none(v) for k, v in errors.items()}, "drift_max": errors[worst], "drift_op": worst}


def train(cfg: Config, run_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Train a model from ``cfg`` into ``run_dir`` (a new ``runs/<task>-<time>`` folder when ``None``).

    Returns:
        The run folder, holding ``config.yaml``, ``checkpoints/``, ``metrics.jsonl`` and ``loss.png``.

    Raises:
        DataError: the dataset checks failed (every problem is listed).
        ConfigError, CheckpointError, NonFiniteError: see :class:`Trainer`.
    """
    ctx = distributed.setup(cfg.train.device)  # joins torchrun's process group, if any
    try:
        if run_dir is None:
            if resume:
                raise ConfigError("--resume: name the run folder to resume with --out")
            # Rank 0's clock names the folder for all processes.
            run_dir = ctx.broadcast(Path("runs") / f"{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}")
        out = Trainer(cfg, run_dir, resume=resume).run()
    except BaseException:
        distributed.shutdown(clean=False)
        raise
    distributed.shutdown()
    return out
