"""From a configuration to ready objects, and a trained run loaded back for inference.

The config layer of the diffusion stack: :func:`build_scheduler` and :func:`build_pipeline` turn the
``diffusion`` / ``sample`` sections into MONAI schedulers and a
:class:`~idm3d.diffusion.pipeline.DiffusionPipeline`, turning the lower layers' ``ValueError`` into
messages that name the key. :func:`load_run` rebuilds a run's model, loads a checkpoint and returns a
:class:`LoadedRun` whose :meth:`~LoadedRun.infer` is what ``idm3d sample``, ``idm3d evaluate`` and the demo
call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.schedulers import Scheduler
from torch import Tensor, nn

from idm3d import devices
from idm3d.diffusion import schedule
from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.errors import ArgumentError, CheckpointError, ConfigError
from idm3d.runs.checkpoint import TrainState, check_signature, load_state_strict
from idm3d.runs.config import Config, SampleConfig, config_from_dict, config_to_dict
from idm3d.runs.model_factory import (
    architecture_signature,
    build_model,
    build_model_from_record,
    model_channels,
    record_disagreement,
)
from idm3d.runs.precision import autocast, check_precision
from idm3d.runs.rundir import RunDir

__all__ = [
    "BACKGROUND",
    "LoadedRun",
    "build_pipeline",
    "build_scheduler",
    "load_pipeline",
    "load_run",
    "mask_background",
    "resolve_device",
    "sample_settings",
]

BACKGROUND = -1.0  # preprocessing clips below-brain intensities and pads with -1


def resolve_device(name: str | torch.device, option: str = "train.device") -> torch.device:
    """:func:`idm3d.devices.resolve_device`, with an error naming ``option``."""
    try:
        return devices.resolve_device(name)
    except ArgumentError as err:
        raise ConfigError(f"{option}: {err.detail}") from None


# The scheduler layer's argument names (ArgumentError.argument) -> the config keys they come from.
_SCHEDULER_KEYS = {
    "kind": "sample.sampler",
    "num_inference_steps": "sample.steps",
    "schedule": "diffusion.schedule",
    "prediction_type": "diffusion.prediction_type",
    "sample_method": "diffusion.sample_method",
}


def build_scheduler(cfg: Config, kind: str | None = None, steps: int | None = None) -> Scheduler:
    """The MONAI scheduler of ``cfg.diffusion``: the training one (``kind`` ``None``: DDPM or RFlow by
    ``diffusion.kind``), or a sampler with ``steps`` network calls (``ddpm``/``ddim``, ``euler``/``heun``)."""
    try:
        return schedule.build_scheduler(cfg.diffusion, kind, steps)  # type: ignore[arg-type]
    except ArgumentError as err:
        if err.argument not in _SCHEDULER_KEYS:
            raise
        raise ConfigError(f"{_SCHEDULER_KEYS[err.argument]}: {err.detail}") from None


def sample_settings(cfg: Config, **overrides: object) -> SampleConfig:
    """The run's ``sample`` section with non-``None`` overrides applied, checked like a config file."""
    data = config_to_dict(cfg)
    data["sample"].update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data).sample


def build_pipeline(
    cfg: Config, model: nn.Module, device: torch.device, settings: SampleConfig | None = None, precision: str = "fp32"
) -> DiffusionPipeline:
    """The run's pipeline: its model, training scheduler, loss and (with ``settings``) sampling window/precision."""
    precision = settings.precision if settings is not None else precision
    return DiffusionPipeline(
        model,
        build_scheduler(cfg),
        loss=cfg.diffusion.loss,
        ssim_weight=cfg.diffusion.ssim_weight,
        roi_size=None if settings is None else settings.roi_size,
        overlap=0.25 if settings is None else settings.overlap,
        autocast=lambda: autocast(precision, device),
        coordinates=cfg.data.patch.coordinates,
    )


AVERAGE_SEED_STRIDE = 100003  # chain k of an average uses seed + k * stride: apart from the per-case seeds


def mask_background(volume: Tensor, mask: Tensor) -> Tensor:
    """``volume`` with every voxel outside the bool ``mask`` (broadcast over channels) set to the background."""
    return torch.where(mask.to(volume.device).bool(), volume, torch.full_like(volume, BACKGROUND))


@dataclasses.dataclass
class LoadedRun:
    """A trained run ready for inference (``idm3d.load_run``): its model, settings and pipeline.

    Attributes:
        model: the network with the EMA (``weights == "ema"``) or raw (``"model"``) weights, in eval mode.
        pipeline: the ready :class:`~idm3d.diffusion.pipeline.DiffusionPipeline` (the run's training scheduler
            and loss, ``sample.roi_size``/``overlap``/``precision``); ``pipeline.sample(shape, condition,
            scheduler=run.scheduler())`` is the chain :meth:`infer` runs.
        settings: the ``sample`` section with the overrides given to ``load_run``.
        config, state, checkpoint, run: the run's configuration, the checkpoint's TrainState and path, its RunDir.

    Example::

        run = idm3d.load_run("runs/t1t2")
        t2 = run.infer(condition=t1)  # (1, sources, X, Y, Z) in [-1, 1]
    """

    run: RunDir
    config: Config
    model: nn.Module
    checkpoint: Path
    state: TrainState
    weights: str  # "ema" or "model"
    settings: SampleConfig
    device: torch.device
    pipeline: DiffusionPipeline

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def sources(self) -> list[str]:
        return list(self.config.data.sources) if self.config.data.task == "translate" else []

    @property
    def targets(self) -> list[str]:
        return list(self.config.data.targets)

    def scheduler(self) -> Scheduler:
        """A fresh sampling scheduler of the run's settings (``sample.sampler``, ``sample.steps``)."""
        return build_scheduler(self.config, self.settings.sampler, self.settings.steps)

    @property
    def start_timestep(self) -> int:
        """Where an unconditional run's SDEdit reconstruction starts (``sample.strength`` of the chain)."""
        return round(self.settings.strength * (self.config.diffusion.num_train_timesteps - 1))

    def infer(
        self,
        *,
        condition: Tensor | None = None,
        target: Tensor | None = None,
        shape: Sequence[int] | None = None,
        seed: int | None = None,
        progress: bool = False,
        position: Tensor | None = None,
    ) -> Tensor:
        """One ``(1, targets, X, Y, Z)`` volume on CPU, in the preprocessed intensity range.

        Translation runs take the sources' ``condition`` (1, sources, X, Y, Z). Unconditional runs take
        ``target`` (1, targets, X, Y, Z), noised to :attr:`start_timestep` and denoised back (SDEdit), or a
        ``shape`` (X, Y, Z) to generate from noise. ``seed`` defaults to ``sample.seed``. ``position`` (2, 3):
        with ``data.patch.coordinates``, the grid's corner in its whole volume and that volume's shape (None:
        the grid is the whole volume, e.g. a whole scan of any size). With ``sample.average`` K > 1 the
        result is the mean of K chains (seeds ``seed + k * 100003``).
        """
        sc = self.settings
        given = condition if condition is not None else target
        if (condition is None) == bool(self.sources) or (given is None and shape is None):
            raise ValueError(f"infer: this run takes {'condition=' if self.sources else 'target= or shape='}")
        grid = given.shape[2:] if shape is None else tuple(shape)
        start = {} if target is None else {"x_start": target, "start_timestep": self.start_timestep}
        seed = sc.seed if seed is None else seed
        total = None
        for k in range(sc.average):  # sample.average chains, summed on the fly (one volume in memory)
            volume = self.pipeline.sample(
                (1, len(self.targets), *grid), condition, scheduler=self.scheduler(),
                generator=torch.Generator().manual_seed(seed + k * AVERAGE_SEED_STRIDE), eta=sc.eta,
                device=self.device, progress=progress, position=position, **start,
            ).cpu()
            total = volume if total is None else total + volume
        return total / sc.average

    def masked(self, volume: Tensor, mask: Tensor) -> Tensor:
        """``volume`` outside ``mask`` set to the background when the run says so (``sample.mask_output``)."""
        return mask_background(volume, mask) if self.settings.mask_output and self.sources else volume


def load_run(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    use_ema: bool | None = None,
    device: str | torch.device = "auto",
    **overrides: Any,
) -> LoadedRun:
    """Rebuild a run's model and load a checkpoint's weights (EMA unless ``sample.use_ema`` false).

    The network is rebuilt from the model record alone (the checkpoint's safetensors metadata, else the
    run's ``model.json``); runs written before model records existed are rebuilt from their config.

    Args:
        run_dir: the run folder.
        checkpoint: a checkpoint JSON/safetensors path; the newest committed one when ``None``.
        use_ema: EMA weights (``ema/``) or the raw ones (``model/``); default the run's ``sample.use_ema``.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (``--device``).
        overrides: ``sample`` settings to change (``sampler``, ``steps``, ``eta``, ``seed``, ``precision``...);
            ``None`` values keep the run's.

    Raises:
        ConfigError: not a run folder, bad device or settings. CheckpointError: no checkpoint, tampered,
            another architecture, a bad model record, no weights of the asked kind.
    """
    run = RunDir(run_dir)
    cfg = run.read_config()
    dev = resolve_device(device, "--device")
    settings = sample_settings(cfg, **overrides)
    check_precision(settings.precision, dev, "--precision")
    if use_ema is None:
        use_ema = settings.use_ema
    tensors, state, path = run.load_checkpoint(checkpoint)  # verified (sha256) before its metadata is trusted
    record, source = run.checkpoint_model_record(path)
    if record is not None:
        model = build_model_from_record(record, source)
        disagreement = record_disagreement(record, cfg.model)
        if disagreement is not None:  # config.yaml edited after training, or another run's checkpoint
            raise CheckpointError(f"{path}: checkpoint is from another architecture ({disagreement})")
    else:  # a run from before model records: its config says what to build
        model = build_model(cfg.model, *model_channels(cfg.data))
    check_signature(path, state.signature, architecture_signature(model, cfg.model))
    prefix = "ema/" if use_ema else "model/"
    if not any(k.startswith(prefix) for k in tensors):
        raise CheckpointError(f"{path}: holds no {prefix[:-1]} weights")
    load_state_strict(model, tensors, prefix, path)
    model.to(dev).eval()
    pipeline = build_pipeline(cfg, model, dev, settings)
    return LoadedRun(run, cfg, model, path, state, "ema" if use_ema else "model", settings, dev, pipeline)


def load_pipeline(run_dir: str | Path, **overrides: Any) -> DiffusionPipeline:
    """The ready :class:`~idm3d.diffusion.pipeline.DiffusionPipeline` of a trained run (diffusers'
    ``from_pretrained``): :func:`load_run`'s pipeline, its network rebuilt from the run's model record.

    ``overrides``: what :func:`load_run` takes (``checkpoint``, ``use_ema``, ``device``, ``sample`` settings
    such as ``precision`` or ``roi_size``).

    Example::

        pipe = idm3d.load_pipeline("runs/t1t2", device="cuda")
        t2 = pipe.sample((1, 1, 64, 64, 64), condition=t1, scheduler=...)
    """
    return load_run(run_dir, **overrides).pipeline
