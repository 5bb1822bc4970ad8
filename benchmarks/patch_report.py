"""The patch study's report: goals judged from the measurements, JSON, markdown and the curves.

Goals (docs/patches.md, issue 14):

* ``time_to_full_quality``: a patch configuration reaches the full-grid model's final held-out SSIM in
  at most 0.5x the full grid's training CPU time (first scored checkpoint at or above it, no
  interpolation), with an equal or better SSIM at equal time (its last checkpoint within the full grid's
  training CPU time: every run stops at the first step past the budget, so they end a step apart). Judged
  per training seed, then over the seeds: met when met with a majority of them (the median ratio is
  reported too);
* ``flops_per_voxel``: IDMUNet training FLOPs per voxel at most 0.5x PatchDDM-3D's at its 128^3 patch.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idm3d.bench.report import Column, machine_markdown, markdown_table
from idm3d.jsonio import dumps

__all__ = ["GOALS", "judge", "summarise", "write_report"]

GOALS = {"time_ratio": 0.5, "flops_ratio": 0.5}
REFERENCE = "full"


def _ok(row: Mapping[str, Any] | None) -> bool:
    return bool(row) and row.get("status") == "ok" and bool(row.get("curve"))


def _reach(curve: list[dict[str, Any]], target: float) -> float | None:
    for point in curve:
        if point["ssim_mask"] is not None and point["cpu_s"] is not None and point["ssim_mask"] >= target:
            return float(point["cpu_s"])
    return None


def judge(rows: Mapping[str, Mapping[str, Any]], flops: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each goal, per configuration or network: the measured ratio and whether it is met (None: not measured)."""
    goals: dict[str, Any] = {"time_to_full_quality": {}, "flops_per_voxel": {}}
    full = rows.get(REFERENCE)
    if _ok(full):
        target, budget = full["curve"][-1]["ssim_mask"], full["curve"][-1]["cpu_s"]
        for name, row in rows.items():
            if name == REFERENCE or not _ok(row):
                continue
            reached = _reach(row["curve"], target)
            ratio = None if reached is None or not budget else reached / budget
            within = [p for p in row["curve"] if p["cpu_s"] is not None and p["cpu_s"] <= budget]
            equal = within[-1] if within else None
            goals["time_to_full_quality"][name] = {
                "full_final_ssim": target, "full_cpu_s": budget, "reached_at_cpu_s": reached, "time_ratio": ratio,
                "final_ssim": row["curve"][-1]["ssim_mask"], "final_cpu_s": row["curve"][-1]["cpu_s"],
                "equal_time_ssim": None if equal is None else equal["ssim_mask"],
                "equal_time_cpu_s": None if equal is None else equal["cpu_s"],
                "met": ratio is not None and ratio <= GOALS["time_ratio"] and equal is not None
                and equal["ssim_mask"] >= target,
            }
    base = flops.get("patchddm", {})
    for net in ("idm-study", "idm"):
        row = flops.get(net, {})
        if row.get("status") == "ok" and base.get("status") == "ok":
            ratio = row["flops_per_voxel"] / base["flops_per_voxel"]
            goals["flops_per_voxel"][net] = {"ratio_vs_patchddm": ratio, "met": ratio <= GOALS["flops_ratio"]}
    return goals


def summarise(per_seed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The time goal over the seeds: ``per_seed`` maps a seed to :func:`judge`'s ``time_to_full_quality``."""
    names = list(dict.fromkeys(name for goals in per_seed.values() for name in goals))
    out: dict[str, Any] = {}
    for name in names:
        judged = {seed: goals[name] for seed, goals in per_seed.items() if name in goals}
        ratios = {seed: g["time_ratio"] for seed, g in judged.items()}
        # A seed that never reached the full grid's SSIM counts as an infinite ratio.
        median = statistics.median(float("inf") if r is None else r for r in ratios.values())
        met = sum(bool(g["met"]) for g in judged.values())
        out[name] = {"seeds": list(judged), "time_ratios": ratios,
                     "median_time_ratio": None if median == float("inf") else median,
                     "met_seeds": met, "met": 2 * met > len(judged)}
    return out


def _plot(path: Path, seeds: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(seeds), figsize=(6.5 * len(seeds), 4.5), sharey=True, squeeze=False)
    for ax, (seed, rows) in zip(axes[0], seeds.items()):
        for name, row in rows.items():
            if not _ok(row):
                continue
            points = [(p["cpu_s"], p["ssim_mask"]) for p in row["curve"] if p["cpu_s"] is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name}: {row['label']}")
        full = rows.get(REFERENCE)
        if _ok(full):
            ax.axhline(full["curve"][-1]["ssim_mask"], color="grey", linestyle="--", linewidth=1,
                       label="full grid, final SSIM")
        ax.set_xlabel("training CPU seconds")
        ax.set_title(f"seed {seed}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out SSIM inside the brain mask")
    fig.suptitle("Time to quality: demo T1 -> T2, held-out band")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _config_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    table = []
    for name, r in rows.items():
        sizes = ", ".join("x".join(map(str, p["size"])) + f" ({p['share']:.0%})" for p in r.get("probe", []))
        table.append({"name": name, "label": r.get("label"), "status": r.get("status"), "sizes": sizes or "n/a",
                      "steps": r.get("steps"), "cpu": r.get("train_cpu_s"), "cpu_step": r.get("cpu_s_per_step"),
                      "gflops": None if r.get("flops_per_step") is None else r["flops_per_step"] / 1e9,
                      "mflops_voxel": None if r.get("flops_per_voxel") is None else r["flops_per_voxel"] / 1e6,
                      "final": r.get("final_ssim_mask"),
                      "psnr": (r.get("curve") or [{}])[-1].get("psnr_mask")})
    return markdown_table(table, (
        Column("name", "config"), Column("label", "what"), Column("status", "status"),
        Column("sizes", "patch sizes (share of steps)"), Column("steps", "steps"),
        Column("cpu", "training CPU s", ".0f"), Column("cpu_step", "CPU s / step", ".2f"),
        Column("gflops", "train GFLOP / step", ".1f"), Column("mflops_voxel", "train MFLOP / voxel", ".3f"),
        Column("final", "final SSIM", ".4f"), Column("psnr", "final PSNR (dB)", ".2f"),
    ))


def _goal_line(name: str, g: Mapping[str, Any]) -> str:
    return (f"- {name} reaches the full grid's final SSIM {g['full_final_ssim']:.4f} (at {g['full_cpu_s']:.0f} CPU s) "
            f"at {_fmt(g['reached_at_cpu_s'], '.0f')} CPU s: ratio {_fmt(g['time_ratio'], '.2f')} (goal <= "
            f"{GOALS['time_ratio']}); at equal time SSIM {_fmt(g['equal_time_ssim'], '.4f')} "
            f"({_fmt(g['equal_time_cpu_s'], '.0f')} s; final {g['final_ssim']:.4f} at "
            f"{_fmt(g['final_cpu_s'], '.0f')} s) -> **{'met' if g['met'] else 'missed'}**")


def _markdown(report: Mapping[str, Any]) -> str:
    seeds, flops, goals, meta = report["seeds"], report["flops"], report["goals"], report["meta"]
    lines = [
        "# Patch training on the demo data: time to quality and FLOPs", "",
        f"Command: `{meta['command']}` (config `{Path(meta['config']).name}`).", "",
        machine_markdown(meta["machine"]), "",
        f"Budget: {meta['cpu_seconds']:g} training CPU seconds per configuration and seed "
        "(`train.max_cpu_seconds`: the trainer stops at the first step past it; the probe of each patch size "
        "only spaces the checkpoints). Held-out SSIM/PSNR inside the brain mask of the demo's held-out band, "
        "EMA weights, the run's DDIM sampler. Training slabs: "
        + ("below and above the band (`--split around`: the band's coordinates lie inside the trained range)."
           if meta.get("split") == "around" else "below the band, as in the demo (`--split below`)."), "",
    ]
    for seed, part in seeds.items():
        lines += [f"## Seed {seed}", "", _config_table(part["configs"]), "",
                  "Held-out SSIM at each checkpoint:", ""]
        for name, r in part["configs"].items():
            curve = r.get("curve") or []
            cells = ", ".join(f"{p['step']} steps / {_fmt(p['cpu_s'], '.0f')} s: {p['ssim_mask']:.4f}" for p in curve)
            lines.append(f"- **{name}**: {cells or r.get('error', 'no result')}")
        lines.append("")
        lines += [_goal_line(name, g) for name, g in part["goals"].items()] or [
            "- time to quality: not measured (the full-grid configuration did not run)"]
        lines.append("")
    lines += ["![SSIM against training CPU time](curves.png)", "", "## Goals over the seeds", ""]
    for name, g in goals["time_to_full_quality"].items():
        ratios = ", ".join(f"seed {seed}: {_fmt(r, '.2f')}" for seed, r in g["time_ratios"].items())
        lines.append(f"- {name}: time ratio {ratios}; median {_fmt(g['median_time_ratio'], '.2f')}; met with "
                     f"{g['met_seeds']} of {len(g['seeds'])} seeds -> **{'met' if g['met'] else 'missed'}** "
                     "(met: with a majority of the seeds)")
    if not goals["time_to_full_quality"]:
        lines.append("- time to quality: not measured")
    lines += ["", f"## Training FLOPs per voxel at {meta['flops_size']}^3 (forward + backward, batch 1)", ""]
    ftable = [{"net": net, "status": f.get("status"), "in": f.get("in_channels"), "params": f.get("parameters"),
               "tflops": None if f.get("flops") is None else f["flops"] / 1e12,
               "mflops": None if f.get("flops_per_voxel") is None else f["flops_per_voxel"] / 1e6,
               "ratio": goals["flops_per_voxel"].get(net, {}).get("ratio_vs_patchddm")}
              for net, f in flops.items()]
    if ftable:
        lines += [markdown_table(ftable, (
            Column("net", "network"), Column("status", "status"), Column("in", "input channels"),
            Column("params", "parameters", ","), Column("tflops", "TFLOP / step", ".2f"),
            Column("mflops", "MFLOP / voxel", ".3f"), Column("ratio", "/ PatchDDM-3D", ".2f"),
        )), ""]
        for net, g in goals["flops_per_voxel"].items():
            lines.append(f"- {net}: {g['ratio_vs_patchddm']:.2f}x PatchDDM-3D's FLOPs per voxel (goal <= "
                         f"{GOALS['flops_ratio']}) -> **{'met' if g['met'] else 'missed'}**")
        lines += ["", "`patchddm`: PatchDDM-3D's published network (8 input channels), counted on the meta device; "
                  "`idm-study`: the study's IDMUNet (configs/demo.yaml, 5 input channels); `idm`: IDMUNet's defaults "
                  "with 8 input channels. PatchDDM-3D cannot train the study's 16-slice crops (six downsamplings "
                  "need edges that are multiples of 64), so the comparison is per voxel at its own 128^3 patch."]
    else:
        lines.append("Not measured (--no-flops).")
    return "\n".join(lines) + "\n"


def write_report(
    out: Path,
    seeds: Mapping[str, Mapping[str, Mapping[str, Any]]],
    flops: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``curves.png`` into ``out``; return the report.

    ``seeds`` maps each training seed (a label) to its configurations' results.
    """
    per_seed = {seed: {"configs": dict(rows), "goals": judge(rows, {})["time_to_full_quality"]}
                for seed, rows in seeds.items()}
    goals = {"time_to_full_quality": summarise({seed: part["goals"] for seed, part in per_seed.items()}),
             "flops_per_voxel": judge({}, flops)["flops_per_voxel"]}
    report = {"meta": dict(meta), "seeds": per_seed, "flops": dict(flops), "goals": goals}
    (out / "report.json").write_text(dumps(report, indent=2), encoding="utf-8")
    _plot(out / "curves.png", seeds)
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report
