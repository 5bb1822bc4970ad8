"""The run folder: its layout, and loading a trained model back from it (for sampling and evaluation).

::

    <run>/config.yaml           the resolved configuration
    <run>/run.json              architecture signature, library versions
    <run>/split.json            train/val/test case ids (real data)
    <run>/data.json             reference affine and per-modality intensity scaling of the training cases
    <run>/checkpoints/          step-XXXXXXXX.{safetensors,json}
    <run>/metrics.jsonl         per-step records; <run>/loss.png the curve
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from idm3d.errors import CheckpointError, ConfigError
from idm3d.training.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, load_state_strict
from idm3d.training.config import Config, config_from_dict, config_to_dict
from idm3d.training.model_factory import architecture_signature, build_model, model_channels

__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "DATA_INFO",
    "LOSS_PNG",
    "METRICS",
    "SPLIT",
    "LoadedRun",
    "load_run",
    "read_run_config",
    "resolve_device",
    "versions",
    "write_run_info",
]

CHECKPOINTS = "checkpoints"
CONFIG = "config.yaml"
RUN_INFO = "run.json"
SPLIT = "split.json"
DATA_INFO = "data.json"
METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"


def resolve_device(name: str | torch.device, option: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must be a valid, available torch device."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}: expected auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: {name!r} requested but CUDA is not available")
    return device


def versions() -> dict[str, str]:
    import monai

    import idm3d

    return {
        "idm3d": getattr(idm3d, "__version__", "0"),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def write_run_info(run_dir: Path, cfg: Config, signature: dict[str, Any]) -> None:
    """Write ``config.yaml`` and ``run.json`` (atomically)."""
    atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    atomic_write_text(run_dir / RUN_INFO, json.dumps({"signature": signature, "versions": versions()}, indent=2) + "\n")


def read_run_config(run_dir: str | Path) -> Config:
    """The configuration a run was trained with (``config.yaml``)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"--run {run_dir}: not a run folder ({CONFIG} not found)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


@dataclasses.dataclass
class LoadedRun:
    """A trained run ready for inference."""

    run_dir: Path
    config: Config
    model: nn.Module
    checkpoint: Path
    state: dict[str, Any]
    weights: str  # "ema" or "model"


def load_run(
    run_dir: str | Path,
    checkpoint: str | Path | None = None,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedRun:
    """Rebuild a run's model from its config and load a checkpoint's weights (EMA by default).

    Args:
        run_dir: the run folder.
        checkpoint: a checkpoint JSON/safetensors path; the newest committed one when ``None``.
        use_ema: load the EMA weights (``ema/``) instead of the raw ones (``model/``).
        device: where to put the model.

    Raises:
        ConfigError: not a run folder. CheckpointError: no checkpoint, tampered, other architecture.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir / CHECKPOINTS)
    if path is None:
        raise CheckpointError(f"{run_dir / CHECKPOINTS}: no complete checkpoint")
    in_ch, out_ch = model_channels(cfg.data)
    model = build_model(cfg.model, in_ch, out_ch)
    tensors, state = load_checkpoint(path, expected_signature=architecture_signature(model, cfg.model))
    prefix = "ema/" if use_ema else "model/"
    if not any(k.startswith(prefix) for k in tensors):
        raise CheckpointError(f"{path}: holds no {prefix[:-1]} weights")
    load_state_strict(model, tensors, prefix, path)
    model.to(resolve_device(device, "--device")).eval()
    return LoadedRun(run_dir, cfg, model, path, state, "ema" if use_ema else "model")
