"""Train several demo runs at once, each in its own process with its share of the CPU threads.

The demo's networks are small and its runs independent, so the two translation directions train side
by side, one process each (:func:`idm3d.children.run_config`) with an even share of the cores, and a
CPU-time budget (``train.max_cpu_seconds``, counted per process) gives every run the same work whatever
else the machine does. On a GPU, or with one core, the runs go one after the other in this process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from idm3d import errors
from idm3d.allocator import DEFAULT as DEFAULT_MALLOC
from idm3d.allocator import ENV_VAR as ALLOCATOR_ENV
from idm3d.children import run_config
from idm3d.runs.config import Config, config_from_dict, config_to_dict
from idm3d.training.trainer import train

__all__ = ["available_cores", "train_all", "train_child"]


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def train_child(config: Mapping[str, Any]) -> dict[str, Any]:
    """In a child process: train ``config["config"]`` into ``config["run_dir"]``."""
    cfg = config_from_dict(config["config"])
    return {"run_dir": str(train(cfg, Path(config["run_dir"]), resume=bool(config["resume"])))}


def _raise_child_error(result: Mapping[str, Any], run_dir: Path) -> None:
    """Re-raise a child's failure here: an idm3d error with its own type and message, anything else as one line."""
    kind = getattr(errors, str(result.get("error_type")), None)
    if result.get("error_module") == errors.__name__ and isinstance(kind, type) and issubclass(kind, Exception):
        raise kind(result.get("message", result["error"]))
    raise RuntimeError(f"training {run_dir} in a child process failed: {result.get('error', result['status'])}")


def train_all(
    runs: Sequence[tuple[Config, Path] | tuple[Config, Path, bool]], device: torch.device, jobs: int | None = None
) -> list[Path]:
    """Train each ``(cfg, run_dir[, resume])``: on CPU in up to ``jobs`` child processes at once, else sequentially.

    Args:
        runs: the configs, their run folders and (optionally) whether to resume each from its checkpoint.
        device: the resolved training device; CUDA runs share the GPU one after the other.
        jobs: processes at once (default: one per run, at most one per core); the cores are split evenly
            between them (torch threads per process, at least 1).

    Raises:
        the idm3d error a child raised (same type and message); ``RuntimeError`` for any other failure.
    """
    runs = [(r[0], Path(r[1]), bool(r[2]) if len(r) > 2 else False) for r in runs]
    if not runs:
        return []
    cores = available_cores()
    jobs = min(len(runs), cores if jobs is None else jobs)
    if device.type != "cpu" or jobs < 2:
        return [train(cfg, run_dir, resume=resume) for cfg, run_dir, resume in runs]
    threads = max(1, cores // jobs)
    # A training child keeps the user's allocator setting (benchmark children default to ``tuned``).
    malloc = os.environ.get(ALLOCATOR_ENV, DEFAULT_MALLOC)

    def one(run: tuple[Config, Path, bool]) -> Path:
        cfg, run_dir, resume = run
        payload = {"config": config_to_dict(cfg), "run_dir": str(run_dir), "resume": resume, "threads": threads,
                   "malloc": malloc}
        result = run_config("idm3d.demo.parallel:train_child", payload, poll_s=0.5)
        if result.get("status") != "ok":
            _raise_child_error(result, run_dir)
        return Path(result["run_dir"])

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, runs))
