"""``RunDir``: the run folder, and the only code that reads or writes one.

::

    <run>/config.yaml           the resolved configuration
    <run>/run.json              architecture signature, library versions
    <run>/model.json            the model record: registry name + full constructor arguments (rebuilds the net)
    <run>/split.json            train/val/test case ids (folder data)
    <run>/data.json             reference affine and per-modality intensity scaling of the training cases
    <run>/checkpoints/          step-XXXXXXXX.{safetensors,json}: tensors (+ the model record in the
                                safetensors metadata) + a TrainState
    <run>/metrics.jsonl         per-step records; <run>/loss.png the curve
    <run>/eval-<split>.{json,md} evaluation reports; other figures and reports by name
    <run>/events.out.tfevents.* TensorBoard event files (``tensorboard --logdir runs/``)

Every write is atomic (temporary file, fsync, rename), so a crash leaves the previous file or the new one.
Readers check what they read and fail with one line naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import platform
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from idm3d.data.split import Split, load_split, save_split
from idm3d.errors import CheckpointError, ConfigError, DataError, IDM3DError
from idm3d.jsonio import dumps
from idm3d.runs import checkpoint as ckpt
from idm3d.runs.atomic import TMP_MARK, atomic_write_text
from idm3d.runs.checkpoint import TrainState
from idm3d.runs.config import Config, config_from_dict, config_to_dict
from idm3d.runs.logs import MetricsLog, plot_loss_curve, read_metrics
from idm3d.runs.tensorboard import TensorBoardLog

__all__ = ["WRITE_ERRNOS", "RunDir", "RunWriteError", "versions"]

CHECKPOINTS = "checkpoints"
CONFIG = "config.yaml"
RUN_INFO = "run.json"
MODEL = "model.json"
SPLIT = "split.json"
DATA_INFO = "data.json"
METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"

# OSErrors that mean "this folder takes no more writes" (full disk, quota, read-only or forbidden folder,
# file too large, a failing device): the run stops with one line instead of a traceback.
WRITE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG", "EIO")
    if hasattr(errno, name)
)


class RunWriteError(IDM3DError):
    """A write into the run folder failed (full disk, quota, read-only folder); nothing committed was lost."""


def _space(folder: Path) -> str:
    """``"<free> free of <total>"`` on ``folder``'s file system (its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**30:.1f} GiB"


def versions() -> dict[str, str]:
    """Versions of idm3d, torch, MONAI and Python (recorded with every run and checkpoint)."""
    import monai

    import idm3d

    return {
        "idm3d": getattr(idm3d, "__version__", "0"),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


class RunDir:
    """One run folder (``path``); nothing is created until something is written.

    Args:
        path: the folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------- config

    def write_config(self, cfg: Config, signature: Mapping[str, Any]) -> None:
        """``config.yaml`` and ``run.json`` (architecture signature, versions)."""
        self.create()
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        self.write_json(RUN_INFO, {"signature": dict(signature), "versions": versions()})

    def read_config(self) -> Config:
        """The configuration the run was trained with (``config.yaml``)."""
        path = self.path / CONFIG
        if not path.is_file():
            raise ConfigError(f"--run {self.path}: not a run folder ({CONFIG} not found)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        try:
            return config_from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    # ----------------------------------------------------------------------------- model

    def write_model_record(self, record: Mapping[str, Any]) -> Path:
        """``model.json``: what rebuilds the network (:func:`idm3d.runs.model_factory.model_record`)."""
        self.create()
        return self.write_json(MODEL, dict(record))

    def read_model_record(self) -> dict[str, Any] | None:
        """``model.json`` (a JSON object; checked when built from), or ``None`` for runs written before it."""
        path = self.path / MODEL
        record = _read_json(path, CheckpointError)
        if record is None:
            return None
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(record).__name__}")
        return record

    def checkpoint_model_record(self, path: str | Path | None = None) -> tuple[dict[str, Any] | None, str]:
        """``(record, where)``: the model record that describes a checkpoint (default: the newest) of this run:
        the run's ``model.json``, else the checkpoint's safetensors metadata; ``(None, ...)`` for runs written
        before either existed."""
        record = self.read_model_record()
        if record is not None:
            return record, str(self.path / MODEL)
        found, doc = ckpt.read_state_json(self.checkpoint(path))
        weights = found.with_name(doc["weights_file"])
        return (ckpt.read_model_metadata(weights) if weights.is_file() else None), f"{weights} (model metadata)"

    # ----------------------------------------------------------------------------- data

    def read_split(self) -> Split | None:
        """The saved ``split.json``, or ``None`` (demo data, or a run not started yet)."""
        path = self.path / SPLIT
        return load_split(path) if path.is_file() else None

    def write_split(self, split: Split) -> None:
        self.create()
        save_split(self.path / SPLIT, split)

    def write_data_info(self, info: Mapping[str, Any]) -> None:
        """``data.json``: what sampling needs to know of the training data (see :meth:`read_data_info`)."""
        self.create()
        self.write_json(DATA_INFO, info)

    def read_data_info(self) -> dict[str, Any] | None:
        """``data.json`` (reference affine, working grid, typical intensity scaling), or ``None``."""
        path = self.path / DATA_INFO
        info = _read_json(path, DataError)
        if info is None:
            return None
        _check_data_info(info, path)
        return info

    # ----------------------------------------------------------------------------- checkpoints

    def latest_checkpoint(self) -> Path | None:
        """The state JSON of the newest committed checkpoint, or ``None``."""
        return ckpt.latest_checkpoint(self.checkpoints)

    def list_checkpoints(self) -> list[Path]:
        """The state JSONs of every committed checkpoint, oldest first."""
        return [path for _, path in ckpt.list_checkpoints(self.checkpoints)]

    def checkpoint(self, path: str | Path | None = None) -> Path:
        """``path`` (a checkpoint of this or another run), or the newest one of this run."""
        found = Path(path) if path is not None else self.latest_checkpoint()
        if found is None:
            raise CheckpointError(f"{self.checkpoints}: no complete checkpoint")
        return found

    def remove_stale_files(self) -> list[Path]:
        """Delete what a crash left in ``checkpoints/`` (temporary files, uncommitted weights)."""
        return ckpt.remove_stale_files(self.checkpoints)

    @contextlib.contextmanager
    def writing(self, what: str | None = None) -> Iterator[None]:
        """Turn a failed write (:data:`WRITE_ERRNOS`) inside the block into one :class:`RunWriteError` line.

        The line names the folder, the error, the free space and the newest complete checkpoint, which
        the atomic writes leave intact (temporary files of the failed write are removed).

        Args:
            what: what was being written (default: the file the error names, else "the run folder").
        """
        try:
            yield
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                raise
            name = what or (Path(err.filename).name if err.filename else "a file")
            if name.startswith(".") and TMP_MARK in name:  # a temporary file: name the file it becomes
                name = name[1:name.index(TMP_MARK)]
            code = errno.errorcode.get(err.errno or 0, str(err.errno))
            last = self.latest_checkpoint()
            kept = f"last complete checkpoint {last.name} is intact" if last else "no checkpoint was written yet"
            raise RunWriteError(
                f"{self.path}: cannot write {name} ({err.strerror or err}, {code}); {_space(self.path)} there; "
                f"{kept}; free space and rerun with --resume auto"
            ) from None

    def save_checkpoint(
        self,
        state: TrainState,
        tensors: Mapping[str, Tensor],
        keep: int | None = None,
        model: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``state.step`` atomically, keeping the newest ``keep``; return its JSON path.

        ``model``: the model record, stored (as a JSON string) in the safetensors metadata."""
        metadata = None if model is None else {ckpt.MODEL_METADATA_KEY: json.dumps(dict(model), sort_keys=True)}
        with self.writing(f"checkpoint step-{state.step:08d} in {CHECKPOINTS}/"):
            return ckpt.save_checkpoint(self.checkpoints, state.step, tensors, state.to_json(), keep=keep,
                                        metadata=metadata)

    def load_checkpoint(
        self,
        path: str | Path | None = None,
        expected_signature: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[dict[str, Tensor], TrainState, Path]:
        """Read and verify a checkpoint (default: the newest); return ``(tensors, state, path)``."""
        found = self.checkpoint(path)
        tensors, doc = ckpt.load_checkpoint(found, expected_signature=expected_signature, device=device)
        return tensors, TrainState.from_json(doc, found), found

    def read_state(self, path: str | Path | None = None) -> TrainState:
        """The :class:`TrainState` of a checkpoint (default: the newest), without reading its weights."""
        found, doc = ckpt.read_state_json(self.checkpoint(path))
        return TrainState.from_json(doc, found)

    # ----------------------------------------------------------------------------- metrics, reports

    def metrics_log(self, resume_step: int | None = None) -> MetricsLog:
        """The open ``metrics.jsonl`` (emptied for a new run; cut after ``resume_step`` on resume)."""
        self.create()
        return MetricsLog(self.path / METRICS, resume_step=resume_step)

    def tensorboard_log(self, purge_step: int | None = None) -> TensorBoardLog:
        """A TensorBoard writer whose event files go into the run folder (``purge_step``: see TensorBoardLog)."""
        self.create()
        return TensorBoardLog(self.path, purge_step=purge_step)

    def tensorboard_files(self) -> list[Path]:
        """The run's TensorBoard event files, oldest first."""
        return sorted(self.path.glob("events.out.tfevents.*"))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path / METRICS)

    def plot_loss(self) -> Path | None:
        """``loss.png`` from the metrics log (``None`` before any loss is logged)."""
        return plot_loss_curve(self.read_metrics(), self.path / LOSS_PNG)

    def write_json(self, name: str, value: Any) -> Path:
        """``<run>/<name>`` as strict, indented JSON (NaN/Inf as null), atomically."""
        path = self.path / name
        atomic_write_text(path, dumps(value, indent=2))
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        atomic_write_text(path, text)
        return path


def _read_json(path: Path, error: type[IDM3DError]) -> Any | None:
    """A run file's JSON, ``None`` when the file is absent (a run written before it); bad JSON is ``error``."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{path}: not valid JSON ({err})") from None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_data_info(info: Any, path: Path) -> None:
    """The fields sampling reads must have the expected types: a hand-edited data.json fails here, in one line."""
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(info).__name__}")
    scalings = info.get("scalings", {})
    if not isinstance(scalings, dict) or not all(
        isinstance(s, dict) and _is_number(s.get("lo")) and _is_number(s.get("hi")) for s in scalings.values()
    ):
        raise DataError(f"{path}: 'scalings' must map each modality to {{\"lo\": number, \"hi\": number}}")
    shape = info.get("grid_shape")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)
    ):
        raise DataError(f"{path}: 'grid_shape' must be 3 positive integers, got {shape!r}")
    for key in ("grid_affine", "reference_affine"):
        a = info.get(key)
        if a is not None and not (
            isinstance(a, list) and len(a) == 4
            and all(isinstance(row, list) and len(row) == 4 and all(map(_is_number, row)) for row in a)
        ):
            raise DataError(f"{path}: '{key}' must be a 4x4 list of numbers")
