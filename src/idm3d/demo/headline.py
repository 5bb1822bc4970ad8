"""The demo's headline ``report.md`` / ``report.json``: every direction's results side by side.

Each direction has its full report in its own folder (:mod:`idm3d.demo.report`); the headline repeats
their measured figures, nothing else, and states the goals of T1 -> T2 (the paper's main direction).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idm3d.bench.report import machine_markdown
from idm3d.jsonio import dumps
from idm3d.runs.atomic import atomic_write_text

__all__ = ["build_headline", "headline_markdown", "write_headline"]

_ROWS = (("idm", "IDMUNet"), ("monai", "MONAI DiffusionModelUNet"), ("linear", "linear intensity map"))
_GOALS = ("ssim_mask_at_least_0.90", "psnr_mask_at_least_23")


def _fmt(value: Any, digits: int) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.{digits}f}"


def build_headline(
    reports: Mapping[str, Mapping[str, Any]], folders: Mapping[str, str], timings: Mapping[str, float], command: str
) -> dict[str, Any]:
    """The headline of a demo: per direction its metrics, goals, budgets and folder; shared timings and machine."""
    first = next(iter(reports.values()))
    directions = {}
    for name, r in reports.items():
        directions[name] = {
            "folder": folders[name],
            "sources": r["task"]["sources"], "targets": r["task"]["targets"],
            "metrics": r["metrics"], "goals": r["goals"], "training_slab": r.get("training_slab", {}),
            "training": {label: {k: t.get(k) for k in ("steps", "elapsed_s", "cpu_s", "parameters")}
                         for label, t in r["training"].items()},
        }
    return {
        "title": "idm3d demo: " + " and ".join(
            f"{d['sources'][0].upper()} -> {d['targets'][0].upper()}" for d in directions.values())
                 + " on the MNI ICBM152 2009c template",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command,
        "directions": directions,
        "memory": first["memory"],
        "timings_s": dict(timings),
        "machine": first["machine"],
        "data": first["data"]["description"],
        "licence": first["licence"],
    }


def headline_markdown(h: Mapping[str, Any]) -> str:
    """The human-readable headline."""
    lines = [f"# {h['title']}", "", f"Written {h['created']} by `{h['command']}`. An average brain template "
             "(152 adults), not a patient scan; training slabs below the held-out axial band.", "", "## Outcome", ""]
    for d in h["directions"].values():
        src, tgt = d["sources"][0].upper(), d["targets"][0].upper()
        g, idm = d["goals"], d["training"]["idm"]
        ssim, psnr = g[_GOALS[0]], g[_GOALS[1]]
        lines.append(
            f"- **{src} -> {tgt}**: IDMUNet SSIM {_fmt(ssim['value'], 4)} (goal >= {ssim['goal']:.2f}: "
            f"**{'met' if ssim['met'] else 'not met'}**), PSNR {_fmt(psnr['value'], 2)} dB (goal >= "
            f"{psnr['goal']:g}: **{'met' if psnr['met'] else 'not met'}**) inside the brain mask of the held-out "
            f"band, after {idm['steps']} steps in {_fmt(idm.get('cpu_s'), 0)} CPU s ({_fmt(idm['elapsed_s'], 0)} s "
            f"wall); details in [{d['folder']}/report.md]({d['folder']}/report.md).")
    lines += ["", "## Held-out band, inside the brain mask and over the whole band", "",
              "| direction | model | steps | CPU s | PSNR brain (dB) | SSIM brain | PSNR band (dB) | SSIM band |",
              "|---|---|--:|--:|--:|--:|--:|--:|"]
    for d in h["directions"].values():
        direction = f"{d['sources'][0].upper()} -> {d['targets'][0].upper()}"
        for label, name in _ROWS:
            m, t = d["metrics"][label], d["training"].get(label, {})
            lines.append(f"| {direction} | {name} | {t.get('steps', '-')} | {_fmt(t.get('cpu_s'), 0) if t else '-'} | "
                         f"{_fmt(m.get('psnr_mask'), 2)} | {_fmt(m.get('ssim_mask'), 4)} | {_fmt(m.get('psnr'), 2)} | "
                         f"{_fmt(m.get('ssim'), 4)} |")
    lines += ["", "Each MONAI baseline trained for the CPU time its IDMUNet used (equal budget); the linear map is "
              "least squares on the training slabs' brain voxels.", "", "## Wall times", "",
              machine_markdown(h["machine"]) + ".", "", "| stage | seconds |", "|---|--:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in h["timings_s"].items()]
    lines += ["", "## Data and licence", "", h["data"], "", "```text", h["licence"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_headline(headline: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out`` (atomically)."""
    out = Path(out)
    atomic_write_text(out / "report.json", dumps(headline, indent=2))
    atomic_write_text(out / "report.md", headline_markdown(headline))
    return out / "report.json", out / "report.md"
