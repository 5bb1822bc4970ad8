"""The table of issue 17's goals: each target against the figure measured in the table the row names."""

from __future__ import annotations

from typing import Any

from benchmarks.tables_common import SHORT, fmt, load, table

__all__ = ["goals"]


def _row(name: str, net: str) -> dict[str, Any]:
    return next((r for r in load(name) if r["net"] == net), {})


def _verdict(value: float | None, limit: float) -> str:
    return "n/a" if value is None else ("met" if value <= limit else "**missed**")


def goals() -> str:
    """Issue 17's goals against the measured figures (each from the table named in the row)."""
    idm64, idm128 = _row("memory-64.jsonl", "idm"), _row("memory-128.jsonl", "idm")
    rows = []
    r64 = idm64.get("ratios", {})
    value = (r64.get("monai-ckpt") or {}).get("memory_first")
    rows.append(["first-step memory / monai-ckpt, 64³", "≤ 0.20", fmt(value, ".3f"), _verdict(value, 0.20)])
    ckpt128 = _row("memory-128.jsonl", "monai-ckpt")
    sized = {r["net"]: {p["size"]: p for p in r["probes"]} for r in load("max-size.jsonl")}
    pair = [sized.get(net, {}).get(128, {}).get("first_step_growth_mib") for net in ("idm", "monai-ckpt")]
    if all(pair):  # both first steps at 128³ completed in the max-size run (21 GiB budget)
        value = pair[0] / pair[1]
        rows.append(
            ["first-step memory / monai-ckpt, 128³ (max-size run)", "≤ 0.12", f"{value:.3f}", _verdict(value, 0.12)]
        )
    elif ckpt128.get("status") == "ok":
        value = idm128["ratios"]["monai-ckpt"]["memory_first"]
        rows.append(["first-step memory / monai-ckpt, 128³", "≤ 0.12", f"{value:.3f}", _verdict(value, 0.12)])
    elif ckpt128 and idm128:
        limit = ckpt128.get("max_growth_gib") or 16  # --max-growth-gib of the memory-128 command
        bound = idm128["first_step_growth_mib"] / (limit * 1024)
        rows.append(
            [
                "first-step memory / monai-ckpt, 128³",
                "≤ 0.12",
                f"< {bound:.3f} (monai-ckpt killed at {limit:g} GiB growth, before its first step ended)",
                "met (an upper bound)" if bound <= 0.12 else "not shown",
            ]
        )
    value = (idm128.get("ratios", {}).get("patchddm-ckpt") or {}).get("memory_first")
    rows.append(["first-step memory / patchddm-ckpt, 128³", "≤ 0.35", fmt(value, ".3f"), _verdict(value, 0.35)])
    value = (r64.get("monai-ckpt") or {}).get("cpu_time")
    rows.append(["step CPU time / monai-ckpt, 64³", "≤ 1.0", fmt(value, ".2f"), _verdict(value, 1.0)])
    pair = [sized.get(net, {}).get(128, {}).get("first_step_cpu_s") for net in ("idm", "monai-ckpt")]
    if all(pair):
        value = pair[0] / pair[1]
        rows.append(
            ["first-step CPU time / monai-ckpt, 128³ (max-size run)", "≤ 1.0", f"{value:.2f}", _verdict(value, 1.0)]
        )
    pdm = next((r for r in load("flops-128.jsonl") if r["net"] == "patchddm"), {})
    value = idm128["flops"] / pdm["flops"] if pdm.get("flops") and idm128.get("flops") else None
    rows.append(["FLOPs / patchddm, 128³", "≤ 0.5", fmt(value, ".2f"), _verdict(value, 0.5)])
    for name, size in (("memory-64.jsonl", 64), ("memory-128.jsonl", 128)):
        value = _row(name, "idm").get("throughput_vs_conv_stack")
        rows.append(
            [
                f"GFLOP/CPU-s / conv stack, {size}³",
                "≥ 0.8",
                fmt(value, ".2f"),
                "n/a" if value is None else ("met" if value >= 0.8 else "**missed**"),
            ]
        )
    big_row = _row("idm-256.jsonl", "idm")
    if big_row.get("status") == "ok":
        wall_min = big_row["first_step_s"] / 60
        cpu_min = big_row["first_step_cpu_s"] / 120  # CPU-seconds (all threads) -> minutes of 2 busy cores
        rows.append(
            [
                "256³ step time on 2 cores: wall (CPU-s / 2)",
                "≤ 8 min",
                f"{wall_min:.1f} min ({cpu_min:.1f} min)",
                "met" if wall_min <= 8 else ("met by CPU time only" if cpu_min <= 8 else "**missed**"),
            ]
        )
        gib = big_row["first_step_growth_mib"] / 1024
        rows.append(["256³ step memory (first step)", "≤ 16 GiB", f"{gib:.1f} GiB", _verdict(gib, 16)])
    elif big_row:
        rows.append(
            ["256³ step", "≤ 8 min, ≤ 16 GiB", f"{big_row.get('status')}: {big_row.get('error')}", "**missed**"]
        )
    sized = load("max-size.jsonl")
    nets = {r["net"] for r in sized}
    wanted = {"idm", "idm-plain", "monai", "monai-ckpt", "patchddm", "patchddm-ckpt"}
    found = ", ".join(f"{SHORT[r['net']]} {r['max_size'] or 0}³" for r in sized) or "not run"
    budget_ok = bool(sized) and all(r["budget_gib"] == 21 for r in sized)
    rows.append(
        [
            "largest cube of every net within 21 GiB, one max-size table",
            "table",
            found,
            "met" if budget_ok and wanted <= nets else "**missed**",
        ]
    )
    return "\n".join(["Goals of issue 17:", "", table(["goal", "target", "measured", "verdict"], rows)])
