"""Run configuration: nested dataclasses loaded from YAML/JSON with ``--set key.sub=value`` overrides.

Every value is checked against its declared type and range when loaded, so a typo or a bad value fails
at start-up with one line naming the key (``ConfigError: train.lr: expected a number > 0, got -1``)
instead of deep inside training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from idm3d.errors import ConfigError

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
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass
class PatchScale:
    """One entry of a patch-size mix: patches ``scale * data.patch_size`` per edge on ``share`` of the steps."""

    scale: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    share: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))


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
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32], metadata=_range(MIN_PATCH_EDGE, 1024))
    batch_size: int = field(default=1, metadata=_range(1, 4096))
    val_fraction: float = field(default=0.0, metadata=_range(0.0, 0.9))
    test_fraction: float = field(default=0.2, metadata=_range(0.0, 0.9))
    split_seed: int = 0
    foreground_prob: float = field(default=0.9, metadata=_range(0.0, 1.0))
    spacing: list[float] | None = field(default=None, metadata=_range(0.0, 100.0, lo_open=True))
    spatial_size: list[int] | None = field(default=None, metadata=_range(1, 4096))
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5], metadata=_range(0.0, 100.0))
    margin: int = field(default=2, metadata=_range(0, 1000))
    # percentile: per-volume percentiles -> [-1, 1] (MRI); ct: the fixed HU window -> [-1, 1], outputs in HU
    intensity: Literal["percentile", "ct"] = "percentile"
    window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0], metadata=_range(-100000.0, 100000.0))
    # the crop box and foreground patches: auto = brain with percentile, body with ct (docs/ct.md)
    foreground: Literal["auto", "brain", "body", "none"] = "auto"
    body_threshold: float = field(default=-500.0, metadata=_range(-100000.0, 100000.0))  # HU (foreground body)
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
    num_train_timesteps: int = field(default=1000, metadata=_range(2, 100000))
    schedule: Literal[
        "linear", "linear_beta", "scaled_linear", "scaled_linear_beta", "sigmoid", "sigmoid_beta", "cosine"
    ] = "linear_beta"
    beta_start: float = field(default=1e-4, metadata=_range(0.0, 1.0, lo_open=True))
    beta_end: float = field(default=2e-2, metadata=_range(0.0, 1.0, lo_open=True))
    # null: the kind's own (epsilon for ddpm, flow for rflow); stored resolved, so a run says what it predicts
    prediction_type: Literal["epsilon", "sample", "v_prediction", "flow"] | None = None
    clip_sample: bool = True
    loss: Literal["mse", "l1"] = "mse"
    # + ssim_weight * (1 - SSIM) of the clean-volume estimate against the clean target (0 = off)
    ssim_weight: float = field(default=0.0, metadata=_range(0.0))
    sample_method: Literal["uniform", "logit-normal"] = "uniform"  # rflow training timesteps
    use_timestep_transform: bool = False  # rflow: MONAI's warp, more time near noise for larger volumes
    base_img_size_numel: int = field(default=32 * 32 * 32, metadata=_range(1))  # rflow: the warp's reference size

    def __post_init__(self) -> None:
        if self.prediction_type is None:
            self.prediction_type = "flow" if self.kind == "rflow" else "epsilon"


@dataclass
class LogConfig:
    """TensorBoard logging of a training run (event files in the run folder: ``tensorboard --logdir runs/``)."""

    tensorboard: bool | None = None  # null: on when the tensorboard package is installed
    preview_every: int | None = field(default=None, metadata=_range(0))  # sample slices; null: at checkpoints
    preview_steps: int = field(default=10, metadata=_range(1))  # network calls of the preview sample


@dataclass
class TrainConfig:
    """Optimisation, budget, checkpoints and safety guards."""

    seed: int = 0
    max_steps: int | None = field(default=1000, metadata=_range(1))
    max_seconds: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    # this process's CPU time (all threads; not DataLoader workers): the same work on a busy or idle machine
    max_cpu_seconds: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    lr: float = field(default=1e-4, metadata=_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    warmup_steps: int = field(default=0, metadata=_range(0))
    grad_clip: float | None = field(default=1.0, metadata=_range(0.0, lo_open=True))
    ema_decay: float = field(default=0.999, metadata=_range(0.0, 1.0))
    # fp32, or autocast sub-networks to bf16/fp16 with the invertible core's state kept in fp32
    # (docs/precision.md); fp16 adds dynamic loss scaling. Replaces train.autocast (none|bf16).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    checkpoint_every: int = field(default=500, metadata=_range(1))
    keep_checkpoints: int = field(default=3, metadata=_range(1))
    log_every: int = field(default=10, metadata=_range(1))
    nonfinite_patience: int = field(default=5, metadata=_range(1))
    drift_check_every: int = field(default=100, metadata=_range(0))  # and the first step; 0 = off
    drift_threshold: float = field(default=1e-3, metadata=_range(0.0, lo_open=True))
    drift_action: Literal["warn", "stop"] = "warn"
    progress: bool = True
    log: LogConfig = field(default_factory=LogConfig)
    # signals that stop training after the current step with a checkpoint and exit code 75 (docs/failure-modes.md)
    stop_signals: list[Literal["TERM", "INT", "USR1", "USR2", "HUP"]] = field(default_factory=lambda: ["TERM", "INT"])
    # ranks that split each volume along depth (torchrun --nproc_per_node R; idm3d.training.domain_parallel)
    domain_parallel: int = field(default=1, metadata=_range(1, 1024))


@dataclass
class SampleConfig:
    """Defaults for ``idm3d sample`` / ``idm3d evaluate`` (each overridable on the command line)."""

    # ddpm|ddim for diffusion.kind ddpm, euler|heun for rflow; null: ddim or euler
    sampler: Literal["ddpm", "ddim", "euler", "heun"] | None = None
    steps: int = field(default=50, metadata=_range(1))  # network calls per sample, whatever the sampler
    eta: float = field(default=0.0, metadata=_range(0.0, 1.0))
    seed: int = 0
    use_ema: bool = True
    roi_size: list[int] | None = field(default=None, metadata=_range(4, 4096))
    overlap: float = field(default=0.25, metadata=_range(0.0, 0.95))
    strength: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))
    max_cases: int | None = field(default=None, metadata=_range(1))
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for the denoiser during sampling
    # Translation: voxels outside the sources' brain/foreground mask are set to the background (-1).
    mask_output: bool = False
    # the mean of this many chains from different noise (seeds seed + k * 100003): an estimate of the
    # posterior mean, which trades texture for PSNR/SSIM; 1 = one sample
    average: int = field(default=1, metadata=_range(1, 1000))


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
        _check_consistency(self)


# ----------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """Return ``value`` checked against type ``tp`` (and range ``meta``); raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, meta)
            except ConfigError as err:
                errors.append(err)
                if isinstance(value, (list, tuple)) and typing.get_origin(arg) is list:
                    raise  # a list for the list alternative: its own error names the faulty item
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {'|'.join(map(str, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        _check_range(value, key, meta, "an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        _check_range(value, key, meta, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported option type {tp!r}")  # pragma: no cover - programming error


def _check_range(value: float, key: str, meta: Mapping[str, Any], what: str) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        lo_txt = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        hi_txt = "" if hi is None else f"<= {hi}"
        bounds = " and ".join(t for t in (lo_txt, hi_txt) if t)
        raise ConfigError(f"{key}: expected {what} {bounds}, got {value!r}")


# Deprecated option -> (its replacement in the same section, old value -> new value). Read with a
# FutureWarning and stored under the new name, so configs of older runs still load.
_DEPRECATED: dict[str, tuple[str, dict[str, str]]] = {
    "train.autocast": ("precision", {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}),
}


def _translate_deprecated(data: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    for key, (new, values) in _DEPRECATED.items():
        section, old = key.rsplit(".", 1)
        if section != prefix or old not in data:
            continue
        value = data[old]
        if not isinstance(value, str) or value not in values:
            raise ConfigError(f"{key}: expected one of {'|'.join(values)}, got {value!r} "
                              f"(deprecated: use {section}.{new})")
        data = {k: v for k, v in data.items() if k != old}
        if new in data and data[new] != values[value]:
            raise ConfigError(f"{key}: {value!r} contradicts {section}.{new}={data[new]!r} "
                              f"(deprecated: set only {section}.{new})")
        data[new] = values[value]
        warnings.warn(f"{key} is deprecated; use {section}.{new}={values[value]}", FutureWarning, stacklevel=2)
    return data


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of options, got {data!r}")
    data = _translate_deprecated(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(f"{where}: unknown option (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key, fields[name].metadata)
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if len(d.patch_size) != 3:
        raise ConfigError(f"data.patch_size: expected 3 integers (D, H, W), got {d.patch_size}")
    if not d.targets:
        raise ConfigError("data.targets: expected at least one modality, got []")
    if d.task == "translate" and not d.sources:
        raise ConfigError("data.sources: task 'translate' needs at least one source modality, got []")
    if d.task == "generate" and d.sources:
        raise ConfigError(f"data.sources: task 'generate' takes no source modalities, got {d.sources}")
    overlap = sorted(set(d.sources) & set(d.targets))
    if overlap:
        raise ConfigError(f"data.sources: {overlap} also listed in data.targets")
    if d.root is None and not set(d.sources + d.targets) <= {"t1", "t2"}:
        raise ConfigError(
            f"data.targets: the demo data (data.root null) has modalities t1 and t2, got {d.sources + d.targets}"
        )
    if d.root is not None and d.demo_split != "below":
        raise ConfigError(f"data.demo_split: only for the demo data (data.root null), got {d.demo_split!r} with "
                          f"data.root {d.root!r}")
    if isinstance(d.patch.schedule, list) and (
        not d.patch.schedule or abs(sum(s.share for s in d.patch.schedule) - 1.0) > 1e-6
    ):
        shares = [s.share for s in d.patch.schedule]
        raise ConfigError(f"data.patch.schedule: expected fixed|mixed or {{scale, share}} entries whose shares "
                          f"sum to 1, got shares {shares}")
    if d.spacing is not None and len(d.spacing) not in (1, 3):
        raise ConfigError(f"data.spacing: expected 1 or 3 sizes in mm, or null, got {d.spacing}")
    if d.spatial_size is not None and len(d.spatial_size) != 3:
        raise ConfigError(f"data.spatial_size: expected 3 integers or null, got {d.spatial_size}")
    if len(d.percentiles) != 2 or not d.percentiles[0] < d.percentiles[1]:
        raise ConfigError(f"data.percentiles: expected [lower, upper] with lower < upper, got {d.percentiles}")
    if len(d.window) != 2 or not d.window[0] < d.window[1]:
        raise ConfigError(f"data.window: expected [lower, upper] HU with lower < upper, got {d.window}")
    if d.foreground == "body" and d.intensity != "ct":
        raise ConfigError("data.foreground: body thresholds Hounsfield units; it needs data.intensity ct, got "
                          f"{d.intensity!r}")
    if d.root is None and d.intensity != "percentile":
        raise ConfigError(f"data.intensity: the demo data (data.root null) is MRI; {d.intensity!r} needs data.root")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError(
            f"data.test_fraction: val_fraction + test_fraction must be < 1, got {d.val_fraction + d.test_fraction}"
        )
    if t.max_steps is None and t.max_seconds is None and t.max_cpu_seconds is None:
        raise ConfigError("train.max_steps: set train.max_steps, train.max_seconds and/or train.max_cpu_seconds "
                          "(all are null)")
    _check_objective(cfg)
    if cfg.diffusion.beta_end <= cfg.diffusion.beta_start:
        raise ConfigError(
            f"diffusion.beta_end: expected > beta_start ({cfg.diffusion.beta_start}), got {cfg.diffusion.beta_end}"
        )
    if cfg.sample.steps > cfg.diffusion.num_train_timesteps:
        raise ConfigError(
            f"sample.steps: expected <= diffusion.num_train_timesteps ({cfg.diffusion.num_train_timesteps}), "
            f"got {cfg.sample.steps}"
        )
    if cfg.sample.roi_size is not None and len(cfg.sample.roi_size) != 3:
        raise ConfigError(f"sample.roi_size: expected 3 integers (D, H, W) or null, got {cfg.sample.roi_size}")
    from idm3d.runs.model_factory import check_model_kwargs  # lazy: reads the network's signature

    check_model_kwargs(cfg.model.name, cfg.model.kwargs)


def _check_objective(cfg: Config) -> None:
    """One line when the prediction type or the sampler belongs to the other objective (ddpm vs rflow)."""
    d, flow = cfg.diffusion, cfg.diffusion.kind == "rflow"
    if d.prediction_type not in (("flow", "sample") if flow else ("epsilon", "sample", "v_prediction")):
        want = "flow|sample" if flow else "epsilon|sample|v_prediction"
        raise ConfigError(f"diffusion.prediction_type: diffusion.kind {d.kind} predicts {want}, got "
                          f"{d.prediction_type!r}")
    if (cfg.sample.sampler in ("euler", "heun")) != flow:
        want = "euler|heun" if flow else "ddpm|ddim"
        raise ConfigError(f"sample.sampler: a diffusion.kind {d.kind} run samples with {want}, got "
                          f"{cfg.sample.sampler!r}")


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build a checked :class:`Config` from nested plain data; missing keys take their defaults."""
    return _build(Config, data or {}, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain data (JSON/YAML-safe) that :func:`config_from_dict` turns back into ``cfg``."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({type(err).__name__})") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of nested ``data`` with each ``key.sub=value`` (value parsed as YAML) applied."""
    out: dict[str, Any] = json.loads(json.dumps(data))
    for item in overrides:
        parts, value = _parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text config file (byte {err.start} is not UTF-8)") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML (``yaml.safe_load``) or JSON config file, apply overrides, validate.

    Args:
        path: config file; ``None`` starts from the defaults.
        overrides: ``key.sub=value`` strings, values parsed as YAML scalars/lists.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or out-of-range value (one line, naming the key).
    """
    data = {} if path is None else _read_file(Path(path))
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
