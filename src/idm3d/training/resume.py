"""Which checkpoint a training run starts from: none, the newest (``--resume``), or either (``--resume auto``).

``--resume auto`` is the one command for a job script that may run many times (requeued after preemption,
restarted by torchrun after a dead rank): it starts a run when ``--out`` holds no complete checkpoint and
continues the newest one when it does. Because nobody looks at the command when it reruns, it refuses a
folder whose run was trained with another config, except for the keys in :data:`RESUMABLE_KEYS` (how long,
how often, what is shown, the guards; none changes what a step computes), and names the keys that differ.
Plain ``--resume`` is the deliberate, by-hand continuation: it requires a checkpoint and accepts any
change but the architecture and the seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from idm3d.errors import ConfigError
from idm3d.runs.config import Config, config_from_dict, config_to_dict
from idm3d.runs.rundir import RunDir

__all__ = ["RESUMABLE_KEYS", "ResumeMode", "config_differences", "resume_point"]

ResumeMode = bool | Literal["auto"]

# Keys (or sections, by prefix) that --resume auto lets differ from the run's checkpoint.
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.max_steps", "train.max_seconds", "train.max_cpu_seconds",  # the budget
    "train.checkpoint_every", "train.keep_checkpoints", "train.stop_signals",  # checkpoints and stopping
    "train.log_every", "train.progress", "train.log",  # what is shown
    "train.nonfinite_patience", "train.drift_check_every", "train.drift_threshold", "train.drift_action",  # guards
    "sample",  # sampling defaults: not used by training
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and not (prefix.endswith("kwargs")):  # model.kwargs compares as a whole
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUMABLE_KEYS)


def config_differences(saved: Mapping[str, Any], cfg: Config) -> list[str]:
    """The keys, outside :data:`RESUMABLE_KEYS`, whose values differ between ``saved`` and ``cfg``.

    Args:
        saved: a checkpoint's config (plain data); read through the current schema first, so options added
            since it was written compare at their defaults.
        cfg: the config of the command.
    """
    with contextlib.suppress(ConfigError):  # a config another version wrote: compare what is there
        saved = config_to_dict(config_from_dict(saved))
    old, new = _flatten(saved), _flatten(config_to_dict(cfg))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not _resumable(k))


def resume_point(folder: RunDir, cfg: Config, mode: ResumeMode) -> Path | None:
    """The checkpoint to continue from (``None``: a new run), or a ConfigError naming what is wrong.

    Args:
        folder: the run folder (``--out``).
        cfg: the config of the command.
        mode: ``False`` (a new run: ``folder`` must hold no checkpoint), ``True`` (continue: it must hold
            one) or ``"auto"`` (either; a checkpoint's config must match, see :data:`RESUMABLE_KEYS`).
    """
    existing = folder.latest_checkpoint()
    if mode is False:
        if existing is not None:
            raise ConfigError(f"--out {folder.path}: holds checkpoints already; pass --resume (or --resume auto) "
                              "or choose a new folder")
        return None
    if mode is True:
        if existing is None:
            raise ConfigError(f"--resume: no complete checkpoint in {folder.checkpoints} "
                              "(--resume auto starts a new run then)")
        return existing
    if existing is None:
        return None
    differ = config_differences(folder.read_state(existing).config or {}, cfg)
    if differ:
        raise ConfigError(
            f"--resume auto: {existing} was trained with another config (differs in {', '.join(differ)}; only "
            f"{', '.join(RESUMABLE_KEYS)} may change); use a new --out, or --resume to continue with the change"
        )
    return existing
