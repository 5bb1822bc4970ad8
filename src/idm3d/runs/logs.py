"""Training metrics: a JSONL log that survives resumes, the loss-curve PNG, and memory in use."""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idm3d.jsonio import dumps
from idm3d.runs.atomic import atomic_write_text

__all__ = ["MetricsLog", "memory_mb", "plot_loss_curve", "read_metrics"]


def memory_mb(device: torch.device | None = None) -> float:
    """Memory in MiB: peak CUDA allocation on a GPU device, else the process's current RSS (peak if unknown)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a JSONL metrics file (a line torn by a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


class MetricsLog:
    """Append-only JSONL of per-step records (``{"step": n, ...}``) in a run folder.

    On resume from step ``n`` the records after ``n`` (written by the interrupted run after its last
    checkpoint, and about to be recomputed) are dropped, so the log has each step once.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def read(self) -> list[dict[str, Any]]:
        """Every complete record (a line torn by a crash is skipped)."""
        return read_metrics(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def plot_loss_curve(records: Iterable[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path | None:
    """Plot loss against step (log scale, with a moving average) to ``path``; ``None`` if nothing to plot."""
    points = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float)) and r["loss"] > 0]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*points)
    window = max(1, len(losses) // 20)
    csum = np.cumsum(np.concatenate([[0.0], np.asarray(losses, dtype=np.float64)]))
    counts = np.minimum(np.arange(1, len(losses) + 1), window)
    ends = np.arange(1, len(losses) + 1)
    smooth = (csum[ends] - csum[ends - counts]) / counts
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.35, lw=0.8, label="loss")
    ax.plot(steps, smooth, lw=1.5, label=f"moving average ({window})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
