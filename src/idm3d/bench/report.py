"""Benchmark reporting: the machine, markdown tables, JSON lines, PNG plots and shared CLI options."""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idm3d.errors import ConfigError
from idm3d.jsonio import dumps, json_safe

__all__ = [
    "Column",
    "add_common_arguments",
    "emit",
    "json_line",
    "json_safe",
    "machine_info",
    "machine_markdown",
    "markdown_table",
    "parse_sizes",
    "plot_grouped_bars",
    "progress",
    "ratio",
    "resolve_device",
]


# --------------------------------------------------------------------------- machine / options


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Describe where a benchmark ran: CPU model, cores, torch/CUDA versions, GPU name."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "gpu": None,
        "cuda": torch.version.cuda,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_markdown(info: Mapping[str, Any]) -> str:
    """One markdown line naming the machine, for the head of every benchmark report."""
    gpu = info.get("gpu") or "none"
    return (
        f"Machine: {info.get('cpu_model')} ({info.get('cpu_cores')} cores), GPU: {gpu}, "
        f"torch {info.get('torch')} (CUDA {info.get('cuda') or 'n/a'}), Python {info.get('python')}, "
        f"device `{info.get('device')}`"
    )


def resolve_device(name: str) -> str:
    """Validate ``--device``: ``cpu`` or ``cuda[:N]``, never ``auto`` (a benchmark names what it measures)."""
    if name == "auto" or not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"--device: expected 'cpu' or 'cuda', got {name!r}")
    from idm3d.runs.load import resolve_device as resolve  # lazy: the runs layer imports MONAI

    return str(resolve(name, "--device"))


def parse_sizes(text: str, option: str = "--sizes", multiple: int = 8) -> list[int]:
    """Parse ``"32,64"`` into cube edge lengths, each a positive multiple of ``multiple``."""
    sizes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(f"{option}: expected comma-separated integers, got {text!r}") from None
        if value <= 0 or value % multiple:
            raise ConfigError(f"{option}: each size must be a positive multiple of {multiple}, got {value}")
        sizes.append(value)
    if not sizes:
        raise ConfigError(f"{option}: expected at least one size, got {text!r}")
    return sizes


# --------------------------------------------------------------------------- command-line glue


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, timeout_s: float = 3600.0) -> None:
    """Options every ``idm3d bench`` sub-command shares (device, threads, output)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads in each run")
    parser.add_argument(
        "--timeout", type=float, default=timeout_s, help=f"seconds per configuration (default {timeout_s:g})"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON lines to this file")


def emit(rows: Sequence[Mapping[str, Any]], markdown: str, args: argparse.Namespace) -> None:
    """Print markdown (or JSON lines with ``--json``); write JSON lines to ``--json-out`` if given."""
    lines = [json_line(r) for r in rows]
    out_path = getattr(args, "json_out", None)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines) if getattr(args, "json", False) else markdown, flush=True)


def progress(message: str) -> None:
    """One progress line on stderr (stdout stays clean for markdown/JSON)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- output


def json_line(record: Mapping[str, Any]) -> str:
    """One JSON object on one line; NaN/Inf become ``null`` so any JSON reader accepts it."""
    return dumps(record)


@dataclass(frozen=True)
class Column:
    """A markdown column: record key, header text and a format spec (``".1f"``, ``","``...)."""

    key: str
    header: str
    fmt: str = ""


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "\\|")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Render records as a GitHub markdown table; missing or non-finite values print ``n/a``."""
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(columns))) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c.key), c.fmt) for c in columns) + " |")
    return "\n".join(lines)


def ratio(numerator: Any, denominator: Any) -> float | None:
    """``numerator / denominator`` or ``None`` when either is missing or the denominator is 0."""
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)):
        return None
    return numerator / denominator if denominator else None


def plot_grouped_bars(
    path: str | Path,
    categories: Sequence[str],
    panels: Mapping[str, Mapping[str, Sequence[float | None]]],
    title: str,
) -> Path:
    """Write a PNG with one grouped-bar panel per metric.

    Args:
        path: output PNG.
        categories: x-axis groups (e.g. ``["32^3", "64^3"]``).
        panels: ``{y-label: {series label: one value per category (None = not measured)}}``.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
            ys = [float("nan") if v is None else float(v) for v in values]
            ax.bar(xs, ys, width=width, label=label)
        ax.set_xticks(range(len(categories)), list(categories))
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
