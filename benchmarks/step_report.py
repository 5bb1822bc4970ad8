"""What the lab's per-configuration step benchmarks share (``attention``, ``sampling``, ``segment_depth``):
the options of a timed step and their checks, and the report (markdown or JSON lines, and the exit status).

Each configuration runs in a fresh process (``idm3d.children.run_config``); the rows it returns are what
these helpers print.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from idm3d.bench.report import Column, emit, machine_markdown, markdown_table
from idm3d.errors import ConfigError

__all__ = ["add_step_arguments", "check_counts", "report", "step_columns", "step_config"]


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch``, ``--repeats``, ``--warmup`` and ``--no-flops``: how one configuration's step is timed."""
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")


def step_config(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The part of a configuration (sent to its fresh process) that says how its step is timed."""
    return {
        "batch": args.batch,
        "device": device,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "count_flops": not args.no_flops,
    }


def check_counts(args: argparse.Namespace, positive: Iterable[str]) -> None:
    """Each option named in ``positive`` (``"emb_dim"`` for ``--emb-dim``) is >= 1, and ``--warmup`` >= 0.

    Raises:
        ConfigError: one line naming the first option out of range.
    """
    for name in positive:
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup: expected an integer >= 0, got {args.warmup}")


def step_columns(step_fmt: str, gflops_fmt: str) -> tuple[Column, ...]:
    """The table columns of what a step measured: status, parameters, peak memory growth, time, GFLOP.

    Args:
        step_fmt: format of the step time in seconds (``".3f"``).
        gflops_fmt: format of the GFLOP per step (``".1f"``).
    """
    return (
        Column("status", "status"),
        Column("parameters", "params", ","),
        Column("peak_growth_mib", "peak growth (MiB)", ".1f"),
        Column("step_s", "step (s)", step_fmt),
        Column("gflops", "GFLOP/step", gflops_fmt),
    )


def report(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    info: Mapping[str, Any],
    columns: Sequence[Column],
    head: Sequence[str],
    notes: Sequence[str] = (),
) -> int:
    """Print the rows (``--json``: JSON lines; ``--json-out``: also to a file), each stamped with the machine.

    The markdown reads: ``head``, the machine line, the table of ``columns``, then ``notes``, a blank line
    between each part.

    Returns:
        The exit status: 0 when every configuration ran, 1 otherwise.
    """
    for r in rows:
        r["machine"] = info
    emit(rows, "\n".join([*head, "", machine_markdown(info), "", markdown_table(rows, columns), "", *notes]), args)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1
