"""Run configuration: nested dataclasses loaded from YAML/JSON with ``--set key.sub=value`` overrides.

Every value is checked against its declared type and range when loaded, so a typo or a bad value fails
at start-up with one line naming the key (``ConfigError: train.lr: expected a number > 0, got -1``)
instead of deep inside training.

This module is the schema (the dataclasses, their defaults and ranges) and the entry points; the checking
of each value lives in ``runs.config_convert``, the rules across options in ``runs.config_rules``, reading
files and ``--set`` in ``runs.config_io``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from idm3d.errors import ConfigError
from idm3d.runs.config_convert import build, field_range
from idm3d.runs.config_io import apply_overrides, read_config_file
from idm3d.runs.config_rules import check_consistency

__all__ = [
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "LogConfig",
    "ModelConfig",
    "PatchConfig",
    "PatchScale",
    "SampleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]


MIN_PATCH_EDGE = 4  # the smallest patch edge (data.patch_size, and the sizes of data.patch.schedule)


@dataclass
class PatchScale:
    """One entry of a patch-size mix: patches ``scale * data.patch_size`` per edge on ``share`` of the steps."""

    scale: float = field(default=1.0, metadata=field_range(0.0, 1.0, lo_open=True))
    share: float = field(default=1.0, metadata=field_range(0.0, 1.0, lo_open=True))


@dataclass
class PatchConfig:
    """Patch training (docs/patches.md): position channels and the patch-size schedule.

    ``coordinates``: three input channels with each voxel's whole-volume coordinates in [-1, 1] (training
    patches: their place in the volume; sampling: the whole grid). ``schedule``: ``fixed`` (every step at
    ``data.patch_size``), ``mixed`` (Patch Diffusion's mix: half the steps at ``data.patch_size``, 30% at
    1/2 and 20% at 1/4 of each edge, ``idm3d.data.patch_schedule.PATCH_DIFFUSION_MIX``) or a list of
    ``{scale, share}`` (shares summing to 1); one size per step for the whole batch.
    """

    coordinates: bool = False
    schedule: Literal["fixed", "mixed"] | list[PatchScale] = "fixed"


@dataclass
class DataConfig:
    """Which volumes, which modalities, and how patches are drawn from them."""

    root: str | None = None  # null: the embedded MNI T1/T2 demo templates (train/held-out axial slabs)
    # demo data only: train on the slabs below the held-out band, or below and above it (docs/patches.md)
    demo_split: Literal["below", "around"] = "below"
    task: Literal["generate", "translate"] = "generate"
    targets: list[str] = field(default_factory=lambda: ["t1"])
    sources: list[str] = field(default_factory=list)
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32], metadata=field_range(MIN_PATCH_EDGE, 1024))
    batch_size: int = field(default=1, metadata=field_range(1, 4096))
    val_fraction: float = field(default=0.0, metadata=field_range(0.0, 0.9))
    test_fraction: float = field(default=0.2, metadata=field_range(0.0, 0.9))
    split_seed: int = 0
    foreground_prob: float = field(default=0.9, metadata=field_range(0.0, 1.0))
    spacing: list[float] | None = field(default=None, metadata=field_range(0.0, 100.0, lo_open=True))
    spatial_size: list[int] | None = field(default=None, metadata=field_range(1, 4096))
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5], metadata=field_range(0.0, 100.0))
    margin: int = field(default=2, metadata=field_range(0, 1000))
    # percentile: per-volume percentiles -> [-1, 1] (MRI); ct: the fixed HU window -> [-1, 1], outputs in HU
    intensity: Literal["percentile", "ct"] = "percentile"
    window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0], metadata=field_range(-100000.0, 100000.0))
    # the crop box and foreground patches: auto = brain with percentile, body with ct (docs/ct.md)
    foreground: Literal["auto", "brain", "body", "none"] = "auto"
    body_threshold: float = field(default=-500.0, metadata=field_range(-100000.0, 100000.0))  # HU (foreground body)
    patch: PatchConfig = field(default_factory=PatchConfig)


@dataclass
class ModelConfig:
    """Denoiser choice: ``idm`` (IDMUNet, invertible) or ``monai`` (DiffusionModelUNet), with its kwargs."""

    name: Literal["idm", "monai"] = "idm"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    """Noise schedule and what the network predicts (MONAI scheduler names and options).

    ``kind``: ``ddpm`` (MONAI's DDPM/DDIM schedulers) or ``rflow`` (rectified flow, MONAI's ``RFlowScheduler``:
    the network predicts the velocity x0 - noise, ``prediction_type`` ``flow``, or x0, ``sample``; docs/sampling.md).
    ``schedule``/``beta_*`` are DDPM-only; ``sample_method``/``use_timestep_transform``/``base_img_size_numel``
    are rflow-only (MONAI's names).
    """

    kind: Literal["ddpm", "rflow"] = "ddpm"  # runs from before the flow objective load as ddpm
    num_train_timesteps: int = field(default=1000, metadata=field_range(2, 100000))
    schedule: Literal[
        "linear", "linear_beta", "scaled_linear", "scaled_linear_beta", "sigmoid", "sigmoid_beta", "cosine"
    ] = "linear_beta"
    beta_start: float = field(default=1e-4, metadata=field_range(0.0, 1.0, lo_open=True))
    beta_end: float = field(default=2e-2, metadata=field_range(0.0, 1.0, lo_open=True))
    # null: the kind's own (epsilon for ddpm, flow for rflow); stored resolved, so a run says what it predicts
    prediction_type: Literal["epsilon", "sample", "v_prediction", "flow"] | None = None
    clip_sample: bool = True
    loss: Literal["mse", "l1"] = "mse"
    # + ssim_weight * (1 - SSIM) of the clean-volume estimate against the clean target (0 = off)
    ssim_weight: float = field(default=0.0, metadata=field_range(0.0))
    sample_method: Literal["uniform", "logit-normal"] = "uniform"  # rflow training timesteps
    use_timestep_transform: bool = False  # rflow: MONAI's warp, more time near noise for larger volumes
    base_img_size_numel: int = field(default=32 * 32 * 32, metadata=field_range(1))  # rflow: the warp's reference size

    def __post_init__(self) -> None:
        if self.prediction_type is None:
            self.prediction_type = "flow" if self.kind == "rflow" else "epsilon"


@dataclass
class LogConfig:
    """TensorBoard logging of a training run (event files in the run folder: ``tensorboard --logdir runs/``)."""

    tensorboard: bool | None = None  # null: on when the tensorboard package is installed
    preview_every: int | None = field(default=None, metadata=field_range(0))  # sample slices; null: at checkpoints
    preview_steps: int = field(default=10, metadata=field_range(1))  # network calls of the preview sample


@dataclass
class TrainConfig:
    """Optimisation, budget, checkpoints and safety guards."""

    seed: int = 0
    max_steps: int | None = field(default=1000, metadata=field_range(1))
    max_seconds: float | None = field(default=None, metadata=field_range(0.0, lo_open=True))
    # this process's CPU time (all threads; not DataLoader workers): the same work on a busy or idle machine
    max_cpu_seconds: float | None = field(default=None, metadata=field_range(0.0, lo_open=True))
    lr: float = field(default=1e-4, metadata=field_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=field_range(0.0))
    warmup_steps: int = field(default=0, metadata=field_range(0))
    grad_clip: float | None = field(default=1.0, metadata=field_range(0.0, lo_open=True))
    ema_decay: float = field(default=0.999, metadata=field_range(0.0, 1.0))
    # fp32, or autocast sub-networks to bf16/fp16 with the invertible core's state kept in fp32
    # (docs/precision.md); fp16 adds dynamic loss scaling. Replaces train.autocast (none|bf16).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    checkpoint_every: int = field(default=500, metadata=field_range(1))
    keep_checkpoints: int = field(default=3, metadata=field_range(1))
    log_every: int = field(default=10, metadata=field_range(1))
    nonfinite_patience: int = field(default=5, metadata=field_range(1))
    drift_check_every: int = field(default=100, metadata=field_range(0))  # and the first step; 0 = off
    drift_threshold: float = field(default=1e-3, metadata=field_range(0.0, lo_open=True))
    drift_action: Literal["warn", "stop"] = "warn"
    progress: bool = True
    log: LogConfig = field(default_factory=LogConfig)
    # signals that stop training after the current step with a checkpoint and exit code 75 (docs/failure-modes.md)
    stop_signals: list[Literal["TERM", "INT", "USR1", "USR2", "HUP"]] = field(default_factory=lambda: ["TERM", "INT"])
    # ranks that split each volume along depth (torchrun --nproc_per_node R; idm3d.training.domain_parallel)
    domain_parallel: int = field(default=1, metadata=field_range(1, 1024))


@dataclass
class SampleConfig:
    """Defaults for ``idm3d sample`` / ``idm3d evaluate`` (each overridable on the command line)."""

    # ddpm|ddim for diffusion.kind ddpm, euler|heun for rflow; null: ddim or euler
    sampler: Literal["ddpm", "ddim", "euler", "heun"] | None = None
    steps: int = field(default=50, metadata=field_range(1))  # network calls per sample, whatever the sampler
    eta: float = field(default=0.0, metadata=field_range(0.0, 1.0))
    seed: int = 0
    use_ema: bool = True
    roi_size: list[int] | None = field(default=None, metadata=field_range(4, 4096))
    overlap: float = field(default=0.25, metadata=field_range(0.0, 0.95))
    strength: float = field(default=0.5, metadata=field_range(0.0, 1.0, lo_open=True))
    max_cases: int | None = field(default=None, metadata=field_range(1))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for the denoiser during sampling
    # Translation: voxels outside the sources' brain/foreground mask are set to the background (-1).
    mask_output: bool = False
    # the mean of this many chains from different noise (seeds seed + k * 100003): an estimate of the
    # posterior mean, which trades texture for PSNR/SSIM; 1 = one sample
    average: int = field(default=1, metadata=field_range(1, 1000))


@dataclass
class Config:
    """A whole run: ``data``, ``model``, ``diffusion``, ``train``, ``sample``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.sample.sampler is None:  # the objective's own sampler (stored resolved in the run)
            self.sample.sampler = "euler" if self.diffusion.kind == "rflow" else "ddim"
        check_consistency(self)


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build a checked :class:`Config` from nested plain data; missing keys take their defaults."""
    return build(Config, data or {}, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain data (JSON/YAML-safe) that :func:`config_from_dict` turns back into ``cfg``."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML (``yaml.safe_load``) or JSON config file, apply overrides, validate.

    Args:
        path: config file; ``None`` starts from the defaults.
        overrides: ``key.sub=value`` strings, values parsed as YAML scalars/lists.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or out-of-range value (one line, naming the key).
    """
    data = {} if path is None else read_config_file(Path(path))
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    path = Path(path)
    data = config_to_dict(cfg)
    if path.suffix.lower() in (".yaml", ".yml"):
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
