"""Train several demo runs at once, each in its own process with its share of the CPU threads.

The demo's networks are small and its runs independent, so the two translation directions train side
by side, one process each with an even share of the cores, and a CPU-time budget
(``train.max_cpu_seconds``, counted per process) gives every run the same work whatever else the
machine does. On a GPU, or with one core, the runs go one after the other in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from idm3d.runs.config import Config
from idm3d.training.trainer import train

__all__ = ["available_cores", "train_all"]


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _exit_with_parent(parent: int, every_s: float = 2.0) -> None:
    """End this process soon after ``parent`` does, so a killed demo leaves no training orphans behind.

    A watcher thread, not ``PR_SET_PDEATHSIG``: that signal follows the parent *thread* that started the
    process, and the pool's start-up threads end early. Checkpoints are atomic, so an exit mid-write
    loses nothing committed.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="idm3d-parent-watch", daemon=True).start()


def _train_child(cfg: Config, run_dir: Path, resume: bool, threads: int, parent: int) -> Path:
    _exit_with_parent(parent)
    torch.set_num_threads(threads)
    return train(cfg, run_dir, resume=resume)


def train_all(
    runs: Sequence[tuple[Config, Path] | tuple[Config, Path, bool]], device: torch.device, jobs: int | None = None
) -> list[Path]:
    """Train each ``(cfg, run_dir[, resume])``: on CPU in up to ``jobs`` spawned processes at once, else sequentially.

    Args:
        runs: the configs, their run folders and (optionally) whether to resume each from its checkpoint.
        device: the resolved training device; CUDA runs share the GPU one after the other.
        jobs: processes at once (default: one per run, at most one per core); the cores are split evenly
            between them (torch threads per process, at least 1).

    Raises:
        whatever :func:`~idm3d.training.trainer.train` raises in a child (re-raised here, same type).
    """
    runs = [(r[0], Path(r[1]), bool(r[2]) if len(r) > 2 else False) for r in runs]
    if not runs:
        return []
    cores = available_cores()
    jobs = min(len(runs), cores if jobs is None else jobs)
    if device.type != "cpu" or jobs < 2:
        return [train(cfg, run_dir, resume=resume) for cfg, run_dir, resume in runs]
    threads = max(1, cores // jobs)
    # spawn, not fork: a forked child would inherit this process's OpenMP thread pool and locks
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parent = os.getpid()
        futures = [pool.submit(_train_child, cfg, run_dir, resume, threads, parent) for cfg, run_dir, resume in runs]
        return [f.result() for f in futures]
