"""The training engine: DDPM training of the configured denoiser with crash-safe, resumable checkpoints.

Reproducibility: everything random in step ``i`` (which patches, the noise, the timesteps, dropout) is
drawn from generators seeded by ``(train.seed, i)``, never from state carried across steps. A run resumed
from the checkpoint at step ``n`` therefore sees exactly the batches an uninterrupted run sees from ``n``
on, and, with the weights, EMA and optimizer state restored bit for bit, produces the same losses.

Under torchrun every process runs a Trainer on its share of each step's global batch
(:mod:`idm3d.training.distributed`); ``train.precision`` selects fp32 or bf16/fp16 autocast
(:mod:`idm3d.runs.precision`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from idm3d.diffusion.schedule import sample_timesteps
from idm3d.errors import ConfigError
from idm3d.runs import precision as mixed
from idm3d.runs.checkpoint import TrainState, optimizer_to_flat
from idm3d.runs.config import Config, config_to_dict
from idm3d.runs.data_source import PreparedData, TrainingData, data_source, step_batch
from idm3d.runs.load import build_pipeline, resolve_device
from idm3d.runs.logs import memory_mb
from idm3d.runs.model_factory import architecture_signature, build_model, model_channels, model_record
from idm3d.runs.rundir import RunDir, versions
from idm3d.runs.tensorboard import NullBoard, tensorboard_wanted
from idm3d.training import distributed
from idm3d.training.domain_parallel import domain_context
from idm3d.training.ema import EMA
from idm3d.training.preview import preview_volumes
from idm3d.training.progress import Clock
from idm3d.training.resume import ResumeMode, resume_point
from idm3d.training.state import restore_tensors, training_tensors
from idm3d.training.steps import STREAM_INIT, STREAM_NOISE, STREAM_TORCH, StepResult, step_seed
from idm3d.training.stopping import StopSignals
from idm3d.training.trainer_guards import TrainerGuards

__all__ = ["StepResult", "Trainer", "resolve_device", "step_seed", "train"]

class Trainer(TrainerGuards):
    """Owns the model, EMA, optimizer, pipeline and data of one training run.

    Building a Trainer writes nothing: it reads the run folder (the checkpoint to resume, the saved
    split) through :class:`~idm3d.runs.rundir.RunDir` and the data through its
    :class:`~idm3d.runs.data_source.DataSource`. :meth:`run` opens the run folder (rank 0 writes the
    config, split and data summary) and trains.

    Args:
        cfg: the run configuration.
        run_dir: the run folder.
        resume: ``True``: continue from the newest checkpoint in ``run_dir``; ``False``: ``run_dir`` must
            not already hold checkpoints; ``"auto"``: either, see :func:`~idm3d.training.resume.resume_point`.
        data: training data; built from ``cfg.data`` (with the dataset checks) when ``None``.
    """

    def __init__(
        self, cfg: Config, run_dir: str | Path, resume: ResumeMode = False, data: TrainingData | None = None
    ) -> None:
        self.cfg = cfg
        self.folder = RunDir(run_dir)
        # Every process decides from the folder alone, before any writes: rank 0 writes only after the DDP
        # constructor below, a collective that waits for every process to get there.
        existing = resume_point(self.folder, cfg, resume)
        self.resume = existing is not None
        self.dist = domain_context(distributed.setup(cfg.train.device), cfg)  # depth sharding, when asked
        self.dist.check_batch(cfg.data.batch_size)
        self.device = self.dist.device
        mixed.check_precision(cfg.train.precision, self.device)
        self._board_on, self._board_note = tensorboard_wanted(cfg.train.log.tensorboard)
        in_ch, out_ch = model_channels(cfg.data)
        torch.manual_seed(step_seed(cfg.train.seed, 0, STREAM_INIT))  # same seed, same initial weights
        self.model = build_model(cfg.model, in_ch, out_ch).to(self.device)  # before the (slow) data
        self.model_record = model_record(cfg.model, in_ch, out_ch)  # model.json, and each checkpoint's metadata
        self.prepared: PreparedData | None = None
        if data is None:
            self.prepared = data_source(cfg).prepare(self.folder.read_split())
            data = self.prepared.data
        self.data = data
        self.signature = architecture_signature(self.model, cfg.model)
        self.pipeline = build_pipeline(cfg, self.model, self.device, precision=cfg.train.precision)
        self.scheduler = self.pipeline.scheduler
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.scaler = mixed.grad_scaler(cfg.train.precision, self.device)
        self.step = 0
        self.elapsed = self.cpu = 0.0
        self.nonfinite_streak = 0
        self.skipped_total = 0
        self.last_loss: float | None = None
        self.on_step: list[Callable[[Trainer, StepResult], None]] = []
        self._saved_step: int | None = None
        self._previewed: int | None = None
        self._resumed_from = existing
        if existing is not None:
            self._restore(existing)
            self._saved_step = self.step
        # The training forward goes through DDP when distributed; checks and diagnoses use self.model.
        self.net = self.dist.wrap(self.model)
        self.log: Any = distributed.NullLog()  # the metrics log, opened by run()
        self.board: Any = NullBoard()  # TensorBoard, opened by run() on rank 0

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def ckpt_dir(self) -> Path:
        return self.folder.checkpoints

    # ------------------------------------------------------------------------------------ state

    def _restore(self, path: Path) -> None:
        tensors, state, _ = self.folder.load_checkpoint(path, expected_signature=self.signature)
        restore_tensors(path, tensors, state, self.model, self.ema, self.optimizer, self.scaler)
        self.step, self.elapsed, self.skipped_total = state.step, float(state.elapsed_s), state.skipped_total
        self.cpu = float(state.cpu_s)
        if state.seed is not None and state.seed != self.cfg.train.seed:
            raise ConfigError(
                f"train.seed: {self.cfg.train.seed} differs from the checkpoint's {state.seed} "
                "(the data order would change); keep the seed when resuming"
            )

    def train_state(self) -> TrainState:
        """The checkpoint's JSON half at the current step."""
        _, opt_meta = optimizer_to_flat(self.optimizer)
        return TrainState(
            step=self.step, seed=self.cfg.train.seed, config=config_to_dict(self.cfg), signature=self.signature,
            optimizer=opt_meta, ema_updates=self.ema.num_updates, elapsed_s=self.elapsed, cpu_s=self.cpu,
            skipped_total=self.skipped_total, last_loss=self.last_loss, precision=self.cfg.train.precision,
            grad_scaler=mixed.scaler_state(self.scaler), world_size=self.dist.world_size, versions=versions(),
        )

    def save(self) -> Path:
        """Write a checkpoint at the current step (keeps the newest ``train.keep_checkpoints``)."""
        self._saved_step = self.step
        path = self.ckpt_dir / f"step-{self.step:08d}.json"
        with self.dist.agreed_outcome():  # a failed write on rank 0 (full disk) stops every process with its line
            if self.dist.is_main:  # every process holds the same state: rank 0 writes it
                tensors = training_tensors(self.model, self.ema, self.optimizer)
                path = self.folder.save_checkpoint(self.train_state(), tensors,
                                                   keep=self.cfg.train.keep_checkpoints, model=self.model_record)
        return path

    def _open(self) -> None:
        """Rank 0 writes the run folder's config, split and data summary and opens the metrics log."""
        if not self.dist.is_main:
            return
        run = self.folder
        removed = run.remove_stale_files()  # also before a first checkpoint: a crash may have left some
        run.write_config(self.cfg, self.signature)
        run.write_model_record(self.model_record)
        if self.prepared is not None:
            if self.prepared.split is not None:
                run.write_split(self.prepared.split)
            run.write_data_info(self.prepared.info)
        self.log = run.metrics_log(resume_step=self.step if self.resume else None)
        if self._board_on:
            self.board = run.tensorboard_log(purge_step=self.step + 1 if self.resume else None)
        elif self._board_note:
            tqdm.write(self._board_note, file=sys.stderr)
        if self._resumed_from is not None:
            note = f" (removed {len(removed)} incomplete file(s))" if removed else ""
            tqdm.write(f"idm3d: resuming from {self._resumed_from.name} at step {self.step}{note}", file=sys.stderr)

    # ------------------------------------------------------------------------------------ one step

    def _inputs(self, step: int) -> dict[str, Tensor | None]:
        target, source, position = step_batch(self.data, step)  # position: for coordinate channels
        gen = torch.Generator().manual_seed(step_seed(self.cfg.train.seed, step, STREAM_NOISE))
        noise = torch.randn(target.shape, generator=gen)
        timesteps = sample_timesteps(self.scheduler, target.shape[0], gen, tuple(target.shape[2:]))
        # Every process draws the whole global batch from (seed, step) and keeps its own share.
        share, dev = self.dist.shard, self.device
        return {
            "target": share(target).to(dev),
            "source": None if source is None else share(source).to(dev),
            "noise": share(noise).to(dev),
            "timesteps": share(timesteps).to(dev),
            "position": None if position is None else share(position),
        }

    def train_step(self, step: int, batch: dict[str, Tensor | None] | None = None) -> StepResult:
        """Run optimisation step ``step`` (0-based); non-finite loss or gradients skip the update."""
        b = batch if batch is not None else self._inputs(step)
        tc = self.cfg.train
        torch.manual_seed(step_seed(tc.seed, step, STREAM_TORCH))  # dropout etc.
        lr = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.pipeline.loss(b, self.net)
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

    # ------------------------------------------------------------------------------------ loop

    def _budget_left(self) -> bool:
        tc = self.cfg.train
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return False
        if tc.max_seconds is None and tc.max_cpu_seconds is None:
            return True
        # The times recorded after the last step decide, the ones its checkpoint holds: a resumed run then
        # continues exactly when the run it resumes would have (time spent since is counted at the next
        # step). Rank 0's clock decides for all: processes that disagreed would wait on each other forever.
        return self.dist.agree((tc.max_seconds is None or self.elapsed < tc.max_seconds)
                               and (tc.max_cpu_seconds is None or self.cpu < tc.max_cpu_seconds))

    def _record(self, result: StepResult) -> dict[str, Any]:
        return {"step": self.step, "loss": result.loss, "grad_norm": result.grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _log(self, record: dict[str, Any], result: StepResult, clock: Clock, bar: tqdm) -> None:
        """Every ``train.log_every`` steps, at drift checks and at the last step: a metrics record."""
        # Drift-check steps are always logged: the per-op errors are the point of the check.
        if self.step % self.cfg.train.log_every == 0 or "drift" in record or not self._budget_left():
            rate = clock.steps_per_s()
            record.update(steps_per_s=rate, step_time_s=1.0 / rate if rate > 0 else None,
                          mem_mb=memory_mb(self.device), elapsed_s=self.elapsed, cpu_s=self.cpu)
            if not result.skipped:
                self.log.write(record)
                self.board.scalars(record)
            tc = self.cfg.train
            fields = {"loss": f"{result.loss:.4g}", "mem": f"{record['mem_mb']:.0f}MiB",
                      **clock.postfix(self.step, tc.max_steps, tc.max_seconds, tc.max_cpu_seconds)}
            bar.set_postfix(fields, refresh=False)  # in this order (keyword fields would be sorted)
        bar.update(1)

    def _preview(self, clock: Clock, final: bool = False) -> None:
        """At each preview step (default: each checkpoint) and at the end: sample slices to TensorBoard.

        Not counted as training time, so logging does not change what a time budget buys.
        """
        every = self.cfg.train.log.preview_every
        every = self.cfg.train.checkpoint_every if every is None else every
        if not self.board.enabled or not every or self.step == self._previewed:
            return
        if final or self.step % every == 0:
            with clock.paused():
                try:
                    self.board.images(preview_volumes(self.cfg, self.model, self.ema, self.data, self.device),
                                      self.step)
                except (RuntimeError, ValueError) as err:  # e.g. out of memory: a preview never ends a run
                    tqdm.write(f"idm3d: warning: step {self.step}: TensorBoard preview skipped ({err})",
                               file=sys.stderr)
            self._previewed = self.step

    def _checkpoint(self, final: bool = False) -> None:
        """Every ``train.checkpoint_every`` steps (and at the end, unless just saved): a checkpoint and the curve."""
        due = self.step % self.cfg.train.checkpoint_every == 0
        if (due and not final) or (final and self._saved_step != self.step):
            self.save()
            if not final and self.dist.is_main:
                self.folder.plot_loss()

    def run(self) -> Path:
        """Train until ``train.max_steps``, ``max_seconds`` and/or ``max_cpu_seconds``; return the run folder.

        Raises:
            TrainingStopped: a ``train.stop_signals`` signal arrived; a checkpoint at the current step is written.
            RunWriteError: a write into the run folder failed (full disk...); the last checkpoint is intact.
        """
        with self.folder.writing(), StopSignals(self.cfg.train.stop_signals, announce=self.dist.is_main) as stop:
            return self._run(stop)

    def _run(self, stop: StopSignals) -> Path:
        self._open()
        self._first_step = self.step  # the first step of every run (fresh or resumed) gets a drift check
        clock = Clock(self.elapsed, self.cpu)
        bar = tqdm(total=self.cfg.train.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.cfg.train.progress or not self.dist.is_main)
        try:
            while self._budget_left():
                step = self.step
                result = self.train_step(step)
                self.step, self.elapsed, self.cpu = step + 1, clock.elapsed(), clock.cpu_elapsed()
                clock.tick()
                self._guard_nonfinite(step, result)
                record = self._record(result)
                for hook in self.on_step:
                    hook(self, result)
                self._guard_drift(step, record)
                self._log(record, result, clock, bar)
                self._checkpoint()
                self._preview(clock)
                if stop.agreed(self.dist):  # every process, after the same step
                    self._checkpoint(final=True)
                    self.dist.barrier()  # written before any process exits (torchrun would kill rank 0)
                    raise stop.stopped(self.step, self.ckpt_dir / f"step-{self.step:08d}.json")
            self._checkpoint(final=True)
            self._preview(clock, final=True)
        finally:
            bar.close()
            self.log.close()
            self.board.close()
        if self.dist.is_main:
            self.folder.plot_loss()
        return self.run_dir


def train(cfg: Config, run_dir: str | Path | None = None, resume: ResumeMode = False) -> Path:
    """Train a model from ``cfg`` into ``run_dir`` (a new ``runs/<task>-<time>`` folder when ``None``).

    Returns:
        The run folder, holding ``config.yaml``, ``checkpoints/``, ``metrics.jsonl`` and ``loss.png``.

    Raises:
        DataError: the dataset checks failed (every problem is listed).
        ConfigError, CheckpointError, NonFiniteError: see :class:`Trainer`.
        TrainingStopped, RunWriteError: see :meth:`Trainer.run`.
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
