"""``python -m benchmarks.domain_max_size``: the largest cube a depth-sharded training step fits per rank budget.

Each probe is the first training step (no warm-up) of ``R`` ranks on an ``S^3`` volume
(:func:`benchmarks.domain_parallel.measure`), as if each rank were a device of ``--budget-gib``: the
probe fits when every rank's step peak (RSS high-water mark above the step's start) stays within the
budget. A watchdog stops all ranks once one passes the budget, or once together they pass
``--machine-gib`` (all ranks share this machine's memory). A probe whose expected total (ranks x (start
RSS + expected growth, at most the budget)) exceeds ``--machine-gib`` is not run and is recorded as
``not_measured`` with the total it would need.

The per-rank peaks that were measured are fitted by least squares to
``peak(D, R) = a D^3 / R + b D^3 + c``: the depth-sharded maps, the replicated ones (the spatial
attention's gathered low-resolution map) and a per-rank constant (buffers, gradient sum); the halo
planes (``D^2`` per rank) are small beside these and left to the fit's residuals. The fit estimates the
per-rank peak of the ``--estimate`` configurations, labelled as an estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.domain_parallel import measure
from idm3d.errors import ConfigError

__all__ = ["add_arguments", "fit_peaks", "parse_probe", "run"]

GIB = 2**30
MIB = 2**20
_START_DEFAULT_MIB = 1024.0  # a rank's RSS at its step's start before any probe measured one


def parse_probe(text: str) -> tuple[int, list[int]]:
    """``"R:S1,S2"`` (ranks, then the edge lengths to probe) as ``(R, [S1, S2])``."""
    ranks, _, sizes = text.partition(":")
    try:
        parsed = int(ranks), [int(s) for s in sizes.split(",") if s]
    except ValueError:
        parsed = (0, [])
    if parsed[0] < 1 or not parsed[1] or min(parsed[1]) < 1:
        # argparse prints it as one line naming the option
        raise argparse.ArgumentTypeError(f"expected RANKS:SIZE[,SIZE...] with positive integers, got {text!r}")
    return parsed


def fit_peaks(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Least-squares ``peak_mib = a D^3/R + b D^3 + c`` (``D`` in units of 256) over measured rows.

    Returns:
        ``{"a", "b", "c", "points", "residual_mib"}``, or ``None`` with fewer than three points.
    """
    if len(points) < 3:
        return None
    d3 = np.array([(p["size"] / 256) ** 3 for p in points])
    ranks = np.array([p["ranks"] for p in points], dtype=float)
    peaks = np.array([p["peak_mib"] for p in points])
    columns = np.stack([d3 / ranks, d3, np.ones_like(d3)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(columns, peaks, rcond=None)
    residual = peaks - columns @ np.array([a, b, c])
    return {"a": float(a), "b": float(b), "c": float(c),
            "points": [[p["ranks"], p["size"], p["peak_mib"]] for p in points],
            "residual_mib": [float(r) for r in residual]}


def _predict(fit: dict[str, Any], ranks: int, size: int) -> float:
    d3 = (size / 256) ** 3
    return fit["a"] * d3 / ranks + fit["b"] * d3 + fit["c"]


def _reused(paths: list[Path], threads: int) -> dict[tuple[int, int], dict[str, Any]]:
    """First-step rows of earlier ``benchmarks.domain_parallel`` runs, by ``(ranks, size)``."""
    rows = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"--reuse: cannot read {path}: {type(err).__name__}") from None
        for row in data.get("rows", []):
            if row.get("warmup") == 0 and row.get("threads_per_rank") == threads:
                rows[(row["ranks"], row["size"])] = {**row, "status": "ok", "source": str(path)}
    return rows


def _probe(ranks: int, size: int, args: argparse.Namespace, done: list[dict[str, Any]],
           reused: dict[tuple[int, int], dict[str, Any]]) -> dict[str, Any]:
    if (ranks, size) in reused:
        return reused[(ranks, size)]
    budget_mib = args.budget_gib * 1024
    fit = fit_peaks([p for p in done if p["status"] == "ok"])
    expected = min(budget_mib, 1.15 * _predict(fit, ranks, size)) if fit else budget_mib
    start = max((p["rss_start_mib"] for p in done if "rss_start_mib" in p), default=_START_DEFAULT_MIB)
    need_gib = ranks * (start + expected) / 1024
    if need_gib > args.machine_gib:
        return {"ranks": ranks, "size": size, "status": "not_measured", "needs_total_gib": need_gib,
                "expected_growth_mib": expected}
    row = measure(ranks, size, args.threads, 1, 0, budget=int(args.budget_gib * GIB),
                  machine=int(args.machine_gib * GIB))
    row.pop("per_rank", None)
    if row["status"] == "ok" and row["peak_mib"] > budget_mib:  # passed between two watchdog samples
        row["status"] = "over_budget"
    return row


def _cell(p: dict[str, Any]) -> str:
    if p["status"] == "ok":
        return f"{p['size']}: {p['peak_mib']:.0f}"
    if p["status"] == "not_measured":
        return f"{p['size']}: not measured (needs {p['needs_total_gib']:.1f} GiB total on this machine)"
    why = {"over_budget": "over budget", "over_machine": "stopped: the ranks passed the machine cap",
           "machine_low": "stopped: the machine's available memory fell under 1 GiB"}[p["status"]]
    return f"{p['size']}: {why} (stopped at {p['watched_growth_mib']:.0f})"


def _markdown(report: dict[str, Any]) -> str:
    budget = report["budget_gib"]
    lines = [
        f"# Depth-sharded training: largest cube per rank budget of {budget:g} GiB (`benchmarks/domain_max_size.py`)",
        "",
        f"Command: `{report['command']}`. Default `IDMUNet()`, fp32, batch 1, memory-efficient, "
        f"{report['threads']} thread(s) per rank, one process per rank (gloo); each probe is the **first** training "
        "step. A probe fits when every rank's step peak (RSS high-water mark above the step's start) is within "
        f"the budget, as if each rank were a {budget:g} GiB device; all ranks share this machine, whose total "
        f"is capped at {report['machine_gib']:g} GiB. {report['load']}",
        "",
        "| R | largest probed cube that fits | probes (size: largest rank's peak MiB) |",
        "|---|---|---|",
    ]
    for ranks, largest in sorted(report["largest"].items(), key=lambda item: int(item[0])):
        mine = sorted((p for p in report["probes"] if p["ranks"] == int(ranks)), key=lambda p: p["size"])
        cells = "; ".join(_cell(p) for p in mine)
        lines.append(f"| {ranks} | {f'{largest}³' if largest else 'none probed'} | {cells} |")
    fit = report["fit"]
    if fit:
        pts = ", ".join(f"R={r} {s}³" for r, s, _ in fit["points"])
        res = max(abs(r) for r in fit["residual_mib"])
        lines += [
            "",
            "**Estimate** (a fit, not a measurement): per-rank peak MiB = a·(D/256)³/R + b·(D/256)³ + c with "
            f"a = {fit['a']:.0f}, b = {fit['b']:.0f}, c = {fit['c']:.0f}, fitted by least squares to the "
            f"measured first-step peaks ({pts}; largest residual {res:.0f} MiB). Total: R x (estimated peak + "
            f"the largest measured start RSS, {report['start_mib']:.0f} MiB).",
            "",
            "| size | R | estimated per-rank peak GiB | within the budget | estimated total GiB (all ranks) |",
            "|---|---|---|---|---|",
        ]
        for e in report["estimates"]:
            fits = "yes" if e["per_rank_gib"] <= budget else "no"
            lines.append(f"| {e['size']}³ | {e['ranks']} | {e['per_rank_gib']:.1f} | {fits} | {e['total_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe", type=parse_probe, action="append", required=True, metavar="R:S,S",
                        help="ranks and the sizes to probe for them, e.g. 2:256,320 (repeatable)")
    parser.add_argument("--budget-gib", type=float, default=10.0, help="per-rank budget (step peak growth)")
    parser.add_argument("--machine-gib", type=float, default=22.0, help="cap on the ranks' summed RSS")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="JSON of earlier benchmarks.domain_parallel runs whose first-step rows count as probes")
    parser.add_argument("--estimate", type=parse_probe, action="append", default=[], metavar="R:S",
                        help="configurations whose per-rank peak the fit estimates, e.g. 8:512")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/domain-max-size"),
                        help="writes OUT.json and OUT.md")


def _report(args: argparse.Namespace, probes: list[dict[str, Any]]) -> dict[str, Any]:
    largest: dict[str, int] = {}
    for row in probes:
        fits = row["size"] if row["status"] == "ok" else 0
        largest[str(row["ranks"])] = max(largest.get(str(row["ranks"]), 0), fits)
    fit = fit_peaks([p for p in probes if p["status"] == "ok"])
    start = max((p["rss_start_mib"] for p in probes if "rss_start_mib" in p), default=_START_DEFAULT_MIB)
    estimates = [
        {"ranks": r, "size": s, "per_rank_gib": _predict(fit, r, s) / 1024,
         "total_gib": r * (_predict(fit, r, s) + start) / 1024}
        for r, sizes in args.estimate for s in sizes
    ] if fit else []
    return {
        "command": "python -m benchmarks.domain_max_size " + " ".join(sys.argv[1:]),
        "load": f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine).",
        "budget_gib": args.budget_gib, "machine_gib": args.machine_gib, "threads": args.threads,
        "start_mib": start, "probes": probes, "largest": largest, "fit": fit, "estimates": estimates,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    reused = _reused(args.reuse, args.threads)
    probes: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for ranks, sizes in args.probe:  # in the order given: the most wanted probes first
        for size in sizes:
            row = _probe(ranks, size, args, probes, reused)
            probes.append(row)
            print(f"R {ranks} size {size}: {_cell(row)}", flush=True)
            # written after every probe, so a run stopped part-way keeps what it measured
            report = _report(args, probes)
            args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
            args.out.with_suffix(".md").write_text(_markdown(report))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args())
