"""Side-by-side reporting of ``idm3d bench memory``: ratios to every baseline, tables, the plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from idm3d.bench.nets import BASELINES, NET_LABELS
from idm3d.bench.report import Column, machine_markdown, markdown_table, plot_grouped_bars, ratio

__all__ = ["COLUMNS", "RATIO_METRICS", "T_CHANNELS", "add_ratios", "map_mib", "markdown", "plot_rows"]

# The unit T of peaks: one full-resolution fp32 map of IDMUNet's default width (its state there).
T_CHANNELS = 32


def map_mib(size: int, batch: int = 1) -> float:
    """MiB of one T: a ``T_CHANNELS``-channel fp32 map of a ``size``-cube, times the batch."""
    return batch * T_CHANNELS * size**3 * 4 / 2**20

# (record key, short name): the metrics every row is divided by each baseline's.
RATIO_METRICS = (
    ("first_step_growth_mib", "memory_first"),
    ("steady_growth_mib", "memory_steady"),
    ("step_cpu_s", "cpu_time"),
    ("first_step_cpu_s", "first_cpu_time"),
    ("step_s", "time"),
    ("flops", "flops"),
    ("parameters", "params"),
)

COLUMNS = (
    Column("size", "size"),
    Column("label", "network"),
    Column("malloc", "malloc"),
    Column("status", "status"),
    Column("parameters", "params", ","),
    Column("first_step_growth_mib", "first step growth (MiB)", ".0f"),
    Column("first_step_growth_T", "first step (T)", ".2f"),
    Column("steady_growth_mib", "steady growth (MiB)", ".0f"),
    Column("retained_mib", "held after step 1 (MiB)", ".0f"),
    Column("first_step_s", "first step (s)", ".1f"),
    Column("step_s", "steady step (s)", ".1f"),
    Column("step_cpu_s", "steady step CPU (s)", ".1f"),
    Column("gflops", "GFLOP/step", ".0f"),
    Column("gflops_per_cpu_s", "GFLOP per CPU-s", ".1f"),
    Column("energy_j_per_step", "J/step", ".2f"),
)


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("size"), r.get("malloc"), r.get("mode"))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``ratios = {baseline: {metric: row / baseline}}`` (same size, allocator and mode) and
    throughput fields; ``vs_conv_stack`` is the GFLOP-per-CPU-second ratio to the yardstick."""
    by = {(r["net"], *_key(r)): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if isinstance(r.get("size"), int):
            unit = map_mib(r["size"], r.get("batch") or 1)
            for key in ("first_step_growth_mib", "steady_growth_mib", "peak_growth_mib"):
                if r.get(key) is not None:
                    r[key.replace("_mib", "_T")] = r[key] / unit
        if isinstance(r.get("flops"), int):
            r["gflops"] = r["flops"] / 1e9
            cpu = r.get("step_cpu_s") or r.get("first_step_cpu_s")  # first step only: --repeats 0
            if cpu:
                r["gflops_per_cpu_s"] = r["gflops"] / cpu
            if r.get("step_s"):
                r["gflops_per_s"] = r["gflops"] / r["step_s"]
        r["ratios"] = {}
        for base in BASELINES:
            ref = by.get((base, *_key(r)))
            if ref is not None and ref is not r:
                r["ratios"][base] = {name: ratio(r.get(key), ref.get(key)) for key, name in RATIO_METRICS}
    for r in rows:
        ref = by.get(("conv-stack", *_key(r)))
        r["throughput_vs_conv_stack"] = ratio(r.get("gflops_per_cpu_s"), (ref or {}).get("gflops_per_cpu_s"))


def _ratio_table(rows: list[dict[str, Any]]) -> str:
    bases = [b for b in BASELINES if any(b in r.get("ratios", {}) for r in rows)]
    columns = [Column("size", "size"), Column("label", "network"), Column("malloc", "malloc")]
    for base in bases:
        columns += [
            Column(f"{base}:memory_first", f"first-step memory / {base}", ".3f"),
            Column(f"{base}:cpu_time", f"CPU time / {base}", ".2f"),
            Column(f"{base}:first_cpu_time", f"first-step CPU time / {base}", ".2f"),
            Column(f"{base}:flops", f"FLOPs / {base}", ".2f"),
        ]
    columns.append(Column("throughput_vs_conv_stack", "GFLOP/CPU-s / conv-stack", ".2f"))
    flat = []
    for r in rows:
        if r.get("status") != "ok" or r["net"] == "conv-stack":
            continue
        cells = dict(r)
        for base, values in r.get("ratios", {}).items():
            cells.update({f"{base}:{k}": v for k, v in values.items()})
        flat.append(cells)
    return markdown_table(flat, columns)


def markdown(
    rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], sizing: dict, note: str | None
) -> str:
    what = "one training step"
    if getattr(args, "inference", False):
        what = "one sampling step (DDIM)" if getattr(args, "sampling_step", False) else "one no-grad denoiser call"
    out = [
        f"## idm3d bench memory: {what}, batch {args.batch}, precision {args.precision}",
        "",
        machine_markdown(info),
        "",
        f"IDMUNet() defaults: {_count(sizing['idm_params'])} parameters, 1 input channel; MONAI channels "
        f"{tuple(sizing['monai_channels'])}, 2 res blocks, attention at the lowest level: "
        f"{_count(sizing['monai_params'])} parameters, 1 input channel; PatchDDM-3D as published, 8 input "
        "channels. First step: a fresh process's first step; steady: one step after the warm-up. "
        "CPU time is the process's (all threads): the budget on a shared machine. T: one "
        f"{T_CHANNELS}-channel full-resolution fp32 map "
        f"({map_mib(args_size(rows), args.batch):,.0f} MiB at the first size).",
        "",
        markdown_table(rows, COLUMNS),
        "",
        "Ratios (same size and allocator setting; time by process CPU time):",
        "",
        _ratio_table(rows),
    ]
    if note:
        out += ["", f"- {note}"]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"- {r['label']} at {r['size']}^3: {r.get('status')}: {r.get('error')}")
    if any(r.get("memory_method") == "ru_maxrss" for r in rows):
        out.append("- CPU peak from ru_maxrss (VmHWM reset unavailable): only the first step is measured")
    return "\n".join(out)


def args_size(rows: list[dict[str, Any]]) -> int:
    """The first row's cube edge (the T of the header)."""
    return next((r["size"] for r in rows if isinstance(r.get("size"), int)), 0)


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def plot_rows(rows: list[dict[str, Any]], sizes: list[int], nets: list[str], path: Path, info: dict) -> None:
    """Grouped bars of first-step memory and steady step CPU time per size and network."""
    by = {(r["net"], r["size"]): r for r in rows if r.get("malloc", "tuned") == "tuned"}
    panels = {}
    for key, ylabel in (("first_step_growth_mib", "first-step peak growth (MiB)"), ("step_cpu_s", "step CPU time (s)")):
        panels[ylabel] = {NET_LABELS[n]: [by.get((n, s), {}).get(key) for s in sizes] for n in nets}
    where = info.get("gpu") or info.get("cpu_model")
    plot_grouped_bars(path, [f"{s}^3" for s in sizes], panels, f"One training step, {where}")
