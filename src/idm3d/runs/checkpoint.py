"""Crash-safe checkpoints: safetensors weights + a JSON state that commits them.

A checkpoint ``step-00000100`` is two files in ``<run>/checkpoints/``:

* ``step-00000100.safetensors``: every tensor (``model/...``, ``ema/...``, ``optim/...``);
* ``step-00000100.json``: a :class:`TrainState` (step, seed, config, architecture signature, optimizer
  hyper-parameters...) and the sha256 of the weights file.

Each file is written to a temporary name in the same folder, flushed and fsynced, renamed over the final
name with ``os.replace`` (atomic on POSIX) and the folder is fsynced. The JSON is written last, so a
checkpoint exists only once both files are complete; a crash at any point leaves either the previous
checkpoint or the new one, never a torn file. Loading never unpickles (safetensors only) and verifies the
hash, so a tampered or truncated weights file is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from idm3d.errors import CheckpointError, NonFiniteError
from idm3d.jsonio import json_safe
from idm3d.runs import atomic

__all__ = [
    "FORMAT",
    "MODEL_METADATA_KEY",
    "TrainState",
    "check_signature",
    "check_state_fields",
    "checkpoint_paths",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_state_strict",
    "optimizer_from_flat",
    "optimizer_to_flat",
    "read_model_metadata",
    "read_state_json",
    "remove_stale_files",
    "save_checkpoint",
]

FORMAT = "idm3d-checkpoint-v1"
MODEL_METADATA_KEY = "idm3d.model"  # safetensors metadata: the model record (model.json) as a JSON string
_NAME = re.compile(r"^step-(\d{8,})\.json$")
RNG_NOTE = "per-step generators seeded from (seed, step); no RNG state carried"


def checkpoint_paths(folder: str | Path, step: int) -> tuple[Path, Path]:
    """``(weights, state)`` paths of the checkpoint at ``step``."""
    folder = Path(folder)
    return folder / f"step-{step:08d}.safetensors", folder / f"step-{step:08d}.json"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Committed checkpoints ``(step, json_path)`` in ascending step order (temp files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The state JSON of the highest-step committed checkpoint, or ``None``."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def remove_stale_files(folder: str | Path) -> list[Path]:
    """Delete temp files and weights without a committing JSON (left by a crash); return what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    committed = {p.stem for _, p in list_checkpoints(folder)}
    removed = []
    for p in folder.iterdir():
        stale_tmp = atomic.TMP_MARK in p.name
        orphan = p.suffix == ".safetensors" and p.stem not in committed
        if p.is_file() and (stale_tmp or orphan):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (``optim/<param>/<name>``) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{idx}/{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Inverse of :func:`optimizer_to_flat`: load tensors + JSON meta into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _check_finite(tensors: Mapping[str, Tensor]) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"refusing to save a checkpoint: tensor {key} contains NaN/Inf")


def save_checkpoint(
    folder: str | Path,
    step: int,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``; return its JSON path.

    ``metadata``: strings stored in the safetensors header (the model record, :data:`MODEL_METADATA_KEY`).

    Raises:
        NonFiniteError: a floating-point tensor contains NaN/Inf (such weights are never saved).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_finite(tensors)
    weights, meta = checkpoint_paths(folder, step)
    # Private, contiguous CPU copies: safetensors refuses shared storage (tied weights, views).
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    sha = atomic.save_tensors(flat, weights, metadata)
    doc = {**state, "format": FORMAT, "step": int(step), "weights_file": weights.name, "weights_sha256": sha}
    try:
        atomic.atomic_write_text(meta, json.dumps(doc, indent=2, allow_nan=False) + "\n", checkpoint=True)
    except OSError:
        if not meta.is_file():  # not committed: the weights are an orphan, free their space now
            weights.unlink(missing_ok=True)
        raise
    if keep is not None:
        for _, old in list_checkpoints(folder)[:-keep]:
            # JSON first: once it is gone the weights are an orphan, never a half checkpoint.
            old.unlink(missing_ok=True)
            old.with_suffix(".safetensors").unlink(missing_ok=True)
        atomic.fsync_dir(folder)
    return meta


@dataclasses.dataclass
class TrainState:
    """Everything but the tensors of a training checkpoint: the one schema of its state JSON.

    Written by the trainer through :class:`~idm3d.runs.rundir.RunDir`; every field but ``step`` has a
    default, so the checkpoints of older versions (which lacked ``precision``, ``grad_scaler``,
    ``world_size`` or ``versions``) still load. The file fields (``format``, ``weights_file``,
    ``weights_sha256``) are added and verified by :func:`save_checkpoint` / :func:`load_checkpoint`.
    """

    step: int
    seed: int | None = None
    config: dict | None = None
    signature: dict | None = None
    optimizer: dict | None = None
    ema_updates: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # training CPU time of the process (rank 0), over all sessions
    skipped_total: int = 0
    last_loss: float | None = None
    precision: str = "fp32"
    grad_scaler: dict | None = None
    world_size: int = 1
    versions: dict | None = None
    rng: str = RNG_NOTE

    def to_json(self) -> dict[str, Any]:
        """The JSON-able fields (a non-finite last loss is stored as null)."""
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], path: Path | str = "checkpoint") -> TrainState:
        """Check ``doc`` against the schema (naming ``path`` and the field) and build the state."""
        check_state_fields(Path(path), doc, files=False)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


# The JSON types each field may have (from TrainState's annotations) plus the file fields; the required
# ones first. A hand-edited state with a wrong type is refused here, naming the file, rather than failing
# later in int()/float() with a traceback.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "str": (str,), "dict": (dict,),
}
_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "weights_file": (str,),
    "weights_sha256": (str,),
    **{
        f.name: _JSON_TYPES[str(f.type).split(" | ")[0]] + ((type(None),) if "None" in str(f.type) else ())
        for f in dataclasses.fields(TrainState)
    },
}
_REQUIRED_FIELDS = ("step", "weights_file", "weights_sha256")


def check_state_fields(path: Path, state: Mapping[str, Any], files: bool = True) -> None:
    """Raise CheckpointError naming ``path`` when a known state field is missing, mistyped or inconsistent.

    ``files``: also require the file fields (``weights_file``, ``weights_sha256``) of a state JSON on disk.
    """
    for key, types in _STATE_FIELDS.items():
        if key not in state:
            if key in _REQUIRED_FIELDS and (files or key == "step"):
                raise CheckpointError(f"{path}: checkpoint state lacks the field {key!r}")
            continue
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{path}: checkpoint state field {key!r}: expected {expected}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{path}: checkpoint state field {key!r}: expected a finite number, got {value!r}")
        if isinstance(value, int) and value < 0 and key != "seed":
            raise CheckpointError(f"{path}: checkpoint state field {key!r}: expected >= 0, got {value}")
    if not files:
        return
    name = state["weights_file"]
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise CheckpointError(
            f"{path}: checkpoint state field 'weights_file': expected a .safetensors file name in the same "
            f"folder, got {name!r}"
        )
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{path}: checkpoint state says step {state['step']}, its file name {int(m.group(1))}")


def read_state_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The checked state JSON of a checkpoint (given as its JSON or its ``.safetensors``): ``(json_path, state)``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint state not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not an idm3d checkpoint (format {got!r}, expected {FORMAT!r})")
    check_state_fields(path, state)
    return path, state


def load_checkpoint(
    path: str | Path, expected_signature: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; return ``(tensors, state)``.

    Args:
        path: the checkpoint's JSON (or its ``.safetensors``; the JSON next to it is used).
        expected_signature: if given, its ``digest`` must equal the checkpoint's.
        device: where to put the tensors.

    Raises:
        CheckpointError: missing/unreadable/foreign JSON, missing weights, hash mismatch (tampered or
            truncated), unreadable safetensors, or another architecture.
    """
    path, state = read_state_json(path)
    weights = path.with_name(state["weights_file"])
    if weights == path or not weights.is_file():
        raise CheckpointError(f"{path}: weights file {weights.name!r} is missing")
    sha = atomic.sha256(weights)
    if sha != state.get("weights_sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {sha[:12]}... does not match the recorded "
            f"{str(state.get('weights_sha256'))[:12]}... (file modified or truncated)"
        )
    if expected_signature is not None:
        check_signature(path, state.get("signature"), expected_signature)
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None
    return tensors, state


def read_model_metadata(weights: str | Path) -> dict[str, Any] | None:
    """The model record stored in a safetensors file's metadata (only its header is read), or ``None``.

    Raises:
        CheckpointError: an unreadable header, or a record that is not a JSON object.
    """
    try:
        with safe_open(str(weights), framework="pt") as fh:
            text = (fh.metadata() or {}).get(MODEL_METADATA_KEY)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{weights}: the model record in its metadata is not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{weights}: the model record in its metadata is not a JSON object")
    return record


def check_signature(path: Path, found: Any, expected: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming ``path`` when the architecture signatures differ."""
    if not isinstance(found, Mapping) or found.get("digest") != expected.get("digest"):
        f = found if isinstance(found, Mapping) else {}
        diffs = [
            f"{k}: checkpoint {f.get(k)!r} vs model {expected.get(k)!r}"
            for k in ("class", "name", "in_channels", "out_channels", "num_tensors", "num_parameters", "kwargs")
            if f.get(k) != expected.get(k)
        ]
        detail = "; ".join(diffs) if diffs else "parameter names/shapes differ"
        raise CheckpointError(f"{path}: checkpoint is from another architecture ({detail})")


def load_state_strict(module: nn.Module, tensors: Mapping[str, Tensor], prefix: str, source: Path | str) -> None:
    """Load ``prefix``-ed tensors into ``module``; any missing/unexpected key or shape -> CheckpointError."""
    sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(sub))
    unexpected = sorted(set(sub) - set(own))
    shapes = [k for k in set(own) & set(sub) if tuple(own[k].shape) != tuple(sub[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        if shapes:
            k = sorted(shapes)[0]
            parts.append(f"shape mismatch at {k}: {tuple(sub[k].shape)} vs {tuple(own[k].shape)}")
        raise CheckpointError(f"{source}: checkpoint does not fit the model ({'; '.join(parts)})")
    module.load_state_dict(sub, strict=True)
