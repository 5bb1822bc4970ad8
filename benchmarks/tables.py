"""Regenerate the measurement tables of docs/measurements.md and README's summary from docs/bench/'s JSON.

    PYTHONPATH=src python benchmarks/tables.py            # rewrite the blocks between the markers
    python benchmarks/tables.py --print    # print them instead

Every table names the command that wrote its JSON (``COMMANDS``); nothing here is typed in by hand
except those command lines and the goals' thresholds (issue 17).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from idm3d.bench.compare import add_ratios

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "bench"
BEGIN, END = "<!-- bench-tables:begin -->", "<!-- bench-tables:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary:begin -->", "<!-- summary:end -->"
# file -> (its marked block, what renders it); filled in below the renderers
BLOCKS: dict[str, tuple[str, str]] = {"docs/measurements.md": (BEGIN, END), "README.md": (SUMMARY_BEGIN, SUMMARY_END)}
NETS = "idm,idm-plain,monai,monai-ckpt,patchddm,patchddm-ckpt,conv-stack"
COMMANDS = {
    "memory-64.jsonl": f"idm3d bench memory --sizes 64 --nets {NETS} --threads 2 --warmup 1 --repeats 2 "
    "--max-growth-gib 14 --json-out docs/bench/memory-64.jsonl --plot docs/bench/memory-64.png",
    "memory-128.jsonl": "OMP_NUM_THREADS=1 idm3d bench memory --sizes 128 --nets idm,patchddm-ckpt,conv-stack "
    "--threads 1 --repeats 1 --max-growth-gib 14 --timeout 2400 --json-out docs/bench/memory-128.jsonl",
    "malloc-64.jsonl": "idm3d bench memory --sizes 64 --nets idm --malloc tuned,system --threads 2 "
    "--warmup 4 --repeats 1 --no-flops --json-out docs/bench/malloc-64.jsonl",
    "inference-128.jsonl": "idm3d bench memory --inference --sizes 128 --nets idm,monai,patchddm,conv-stack "
    "--threads 1 --warmup 1 --repeats 1 --max-growth-gib 12 --json-out docs/bench/inference-128.jsonl",
    "flops-128.jsonl": "idm3d bench memory --flops-only --sizes 128 --nets monai,monai-ckpt,patchddm,patchddm-ckpt "
    "--json-out docs/bench/flops-128.jsonl",
    "idm-256.jsonl": "idm3d bench memory --sizes 256 --nets idm --threads 2 --warmup 0 --repeats 0 --no-flops "
    "--max-growth-gib 16 --timeout 3000 --json-out docs/bench/idm-256.jsonl",
    "idm-256-4k.jsonl": "THP_MEM_ALLOC_ENABLE=0 idm3d bench memory --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 16 --timeout 3000 --json-out docs/bench/idm-256-4k.jsonl",
    "inference-256.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm,monai,patchddm,conv-stack "
    "--threads 2 --warmup 0 --repeats 0 --max-growth-gib 20 --json-out docs/bench/inference-256.jsonl",
    # issue 29: the in-place no-grad path; "-before" ran the same command at 35084c6 (before it)
    "sampling-256-before.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 12 --json-out docs/bench/sampling-256-before.jsonl",
    "sampling-256.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 12 --json-out docs/bench/sampling-256.jsonl",
    "sampling-256-bf16.jsonl": "idm3d bench memory --inference --sizes 256 --nets idm --threads 2 --warmup 0 "
    "--repeats 0 --no-flops --max-growth-gib 12 --precision bf16 --json-out docs/bench/sampling-256-bf16.jsonl",
    "sampling-512-step.jsonl": "idm3d bench memory --inference --sampling-step --sizes 512 --nets idm --threads 2 "
    "--warmup 0 --repeats 0 --no-flops --max-growth-gib 21 --timeout 5400 "
    "--json-out docs/bench/sampling-512-step.jsonl",
    "max-size.jsonl": "idm3d bench max-size --budget-gib 21 --nets idm,idm-plain,monai,monai-ckpt,patchddm,"
    "patchddm-ckpt --sizes 64,128,192,256,320 --warmup 0 --threads 2 --timeout 3000 "
    "--json-out docs/bench/max-size.jsonl",
    # issue 29: the same bisection without a graph: one denoiser call, and one DDIM step of the chain
    "max-size-inference.jsonl": "idm3d bench max-size --inference --budget-gib 21 --nets idm,monai,patchddm "
    "--sizes 128,256,512 --warmup 0 --threads 2 --timeout 3000 --json-out docs/bench/max-size-inference.jsonl",
    # not measured yet (the lock was busy); when it is, add its command here:
    # "max-size-sampling-step.jsonl": "idm3d bench max-size --inference --sampling-step --budget-gib 21 "
    # "--nets idm,monai,patchddm --sizes 128,256,512 --warmup 0 --threads 2 --timeout 3000 "
    # "--json-out docs/bench/max-size-sampling-step.jsonl",
}
# max-size files -> what one probe runs
MAX_SIZE = {
    "max-size.jsonl": "one training step each",
    "max-size-inference.jsonl": "one no-grad denoiser call each",
    "max-size-sampling-step.jsonl": "one DDIM step of the sampling chain each (noise, the call, the update)",
}
SHORT = {
    "idm": "IDMUNet (memory-efficient)",
    "idm-plain": "IDMUNet (plain autograd)",
    "monai": "MONAI",
    "monai-ckpt": "MONAI, checkpointed",
    "patchddm": "PatchDDM-3D",
    "patchddm-ckpt": "PatchDDM-3D, checkpointed",
    "conv-stack": "8 x Conv3d(32,32,3)+SiLU",
}


def load(name: str) -> list[dict[str, Any]]:
    """The rows of one JSON-lines file, ratios recomputed by the bench's own definition."""
    path = BENCH / name
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if rows and rows[0].get("bench") == "memory":
        add_ratios(rows)
    return rows


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    return format(value, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def training(name: str) -> str:
    rows = load(name)
    if not rows:
        return ""
    size = rows[0]["size"]
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append([SHORT[r["net"]], r.get("status", "?"), *["n/a"] * 8])
            continue
        body.append(
            [
                SHORT[r["net"]],
                f"{r['parameters'] / 1e6:.2f} M",
                fmt(r.get("first_step_growth_mib"), ",.0f"),
                fmt(r.get("steady_growth_mib"), ",.0f"),
                fmt(r.get("first_step_s"), ".1f"),
                fmt(r.get("first_step_cpu_s"), ".1f"),
                fmt(r.get("step_cpu_s"), ".1f"),
                fmt(r.get("gflops"), ",.0f"),
                fmt(r.get("gflops_per_cpu_s"), ".1f"),
                fmt(r.get("throughput_vs_conv_stack"), ".2f"),
            ]
        )
    head = [
        "network",
        "params",
        "first-step growth (MiB)",
        "steady growth (MiB)",
        "first step (s)",
        "first step CPU (s)",
        "steady step CPU (s)",
        "GFLOP/step",
        "GFLOP/CPU-s",
        "GFLOP/CPU-s / conv stack",
    ]
    ratios = []
    idm = next((r for r in rows if r["net"] == "idm" and r.get("status") == "ok"), None)
    if idm:
        for base, v in idm.get("ratios", {}).items():
            ratios.append(
                [SHORT[base]]
                + [
                    fmt(v.get(k), ".3f" if k.startswith("memory") else ".2f")
                    for k in ("memory_first", "memory_steady", "first_cpu_time", "cpu_time", "flops", "params")
                ]
            )
    out = [f"`{COMMANDS[name]}` ({size}³, one fresh process per row):", "", table(head, body)]
    if ratios:
        out += [
            "",
            f"IDMUNet (memory-efficient) at {size}³ divided by each baseline:",
            "",
            table(
                [
                    "baseline",
                    "first-step memory",
                    "steady memory",
                    "first-step CPU time",
                    "steady CPU time",
                    "FLOPs",
                    "params",
                ],
                ratios,
            ),
        ]
    return "\n".join(out)


def malloc() -> str:
    rows = load("malloc-64.jsonl")
    if not rows:
        return ""
    body = [
        [
            SHORT[r["net"]],
            r["malloc"],
            fmt(r.get("first_step_growth_mib"), ",.0f"),
            fmt(r.get("retained_mib"), ",.0f"),
            fmt(r.get("steady_growth_mib"), ",.0f"),
            fmt(r.get("first_step_cpu_s"), ".1f"),
            fmt(r.get("step_cpu_s"), ".1f"),
        ]
        for r in rows
        if r.get("status") == "ok"
    ]
    head = [
        "network",
        "malloc",
        "first-step growth (MiB)",
        "held after step 1 (MiB)",
        "step-5 growth (MiB)",
        "first step CPU (s)",
        "step-5 CPU (s)",
    ]
    return "\n".join([f"`{COMMANDS['malloc-64.jsonl']}`:", "", table(head, body)])


def inference() -> str:
    names = [n for n in ("inference-128.jsonl", "inference-256.jsonl") if load(n)]
    rows = [r for n in names for r in load(n)]
    if not rows:
        return ""
    body = [
        [
            f"{r['size']}³",
            SHORT[r["net"]],
            r.get("status", "?"),
            fmt(r.get("first_step_growth_mib"), ",.0f"),
            fmt(r.get("first_step_s"), ".1f"),
            fmt(r.get("first_step_cpu_s"), ".1f"),
        ]
        for r in rows
    ]
    head = ["size", "network", "status", "peak growth (MiB)", "time (s)", "CPU (s)"]
    commands = " and ".join(f"`{COMMANDS[n]}`" for n in names)
    return "\n".join(
        [f"{commands} (one no-grad denoiser call, the first in its process; checkpointing "
         "changes nothing without a backward, so the checkpointed baselines are the plain ones here):", "",
         table(head, body)]
    )


SAMPLING = {
    "sampling-256-before.jsonl": "at 35084c6 (before)",
    "sampling-256.jsonl": "in place (after)",
    "sampling-256-bf16.jsonl": "in place, bf16 autocast",
    "sampling-512.jsonl": "in place",
    "sampling-512-bf16.jsonl": "in place, bf16 autocast",
    "sampling-512-step.jsonl": "in place, one DDIM step",
}


def sampling() -> str:
    """Issue 29: IDMUNet's no-grad call (and one sampling step) before and after the in-place path."""
    body = []
    names = [n for n in SAMPLING if load(n)]
    for name in names:
        for r in load(name):
            body.append([
                f"{r['size']}³", SAMPLING[name], r.get("mode", "?"), r.get("precision", "fp32"), r.get("status", "?"),
                fmt(r.get("first_step_growth_mib"), ",.0f"), fmt(r.get("first_step_growth_T"), ".2f"),
                fmt(r.get("first_step_s"), ".0f"), fmt(r.get("first_step_cpu_s"), ".0f"),
            ])
    if not body:
        return ""
    head = ["size", "code", "what", "precision", "status", "peak growth (MiB)", "peak (T)", "time (s)", "CPU (s)"]
    commands = "\n".join(f"- `{COMMANDS[n]}`" for n in names if n in COMMANDS)
    return "\n".join([
        "IDMUNet without a graph (issue 29): one denoiser call, or one step of the sampling chain; T is one "
        "32-channel full-resolution fp32 map (2,048 MiB at 256³, 16,384 MiB at 512³), the state the in-place "
        "core keeps. Commands:", "", commands, "", table(head, body),
    ])


def big() -> str:
    pages = {"idm-256.jsonl": "2 MiB (tuned default)", "idm-256-4k.jsonl": "4 KiB"}
    body = [
        [
            SHORT[r["net"]],
            label,
            r.get("status", "?"),
            fmt(r.get("first_step_growth_mib"), ",.0f"),
            fmt(r.get("first_step_s"), ".0f"),
            fmt(r.get("first_step_cpu_s"), ".0f"),
        ]
        for name, label in pages.items()
        for r in load(name)
    ]
    if not body:
        return ""
    commands = "; ".join(f"`{COMMANDS[name]}`" for name in pages if load(name))
    return "\n".join(
        [
            f"256³, one training step in a fresh process, with and without huge pages: {commands}",
            "",
            table(["network", "pages", "status", "peak growth (MiB)", "wall (s)", "CPU (s)"], body),
        ]
    )


def max_size(name: str = "max-size.jsonl") -> str:
    """The largest cube of every network within the budget, from one ``idm3d bench max-size`` file."""
    rows = load(name)
    if not rows:
        return ""
    body = []
    for r in rows:
        probes = ", ".join(
            f"{p['size']}³: {p['peak_growth_mib']:,.0f} MiB" if p["status"] == "ok" else f"{p['size']}³: {p['status']}"
            for p in r["probes"]
        )
        cube = f"{r['max_size']}³" if r["max_size"] else "none probed"
        body.append([SHORT[r["net"]], cube + (" (largest probed)" if r["hit_max"] else ""), probes])
    return "\n".join(
        [
            f"Largest cube within {rows[0]['budget_gib']:g} GiB, {MAX_SIZE[name]}: `{COMMANDS[name]}`",
            "",
            table(["network", "largest cube", "probes (first-step growth, or why it stopped)"], body),
        ]
    )


def flops() -> str:
    rows = load("flops-128.jsonl")
    idm = next((r for r in load("memory-128.jsonl") if r["net"] == "idm" and r.get("flops")), None)
    if not rows or idm is None:
        return ""
    body = [[SHORT["idm"], f"{idm['parameters'] / 1e6:.2f} M", f"{idm['flops'] / 1e9:,.0f}", "1.00"]]
    body += [
        [
            SHORT[r["net"]],
            f"{r['parameters'] / 1e6:.2f} M",
            f"{r['flops'] / 1e9:,.0f}",
            f"{idm['flops'] / r['flops']:.2f}",
        ]
        for r in rows
        if r.get("flops")
    ]
    return "\n".join(
        [
            f"FLOPs of one 128³ training step: `{COMMANDS['flops-128.jsonl']}` and, for IDMUNet, "
            "the `memory-128` run above:",
            "",
            table(["network", "params", "GFLOP/step", "IDMUNet FLOPs / this"], body),
        ]
    )


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


def _probe(row: dict[str, Any], size: int) -> dict[str, Any]:
    return next((p for p in row.get("probes", []) if p.get("size") == size), {})


def summary() -> str:
    """README's one table: the headline figures, each linked to its page under docs/bench/."""
    mem64 = {r["net"]: r for r in load("memory-64.jsonl")}
    sizes = {r["net"]: r for r in load("max-size.jsonl")}
    big_train = {r["net"]: r for r in load("idm-256.jsonl")}
    infer = {r["net"]: r for r in load("inference-256.jsonl")}
    if not (mem64 and sizes and big_train and infer):
        return ""
    gib = 1024.0

    def mib(row: dict[str, Any] | None, key: str = "peak_growth_mib") -> float | None:
        return None if not row or row.get(key) is None else float(row[key])

    def ratio(a: float | None, b: float | None) -> str:
        return fmt(a / b if a is not None and b else None, ".2f") + "x"

    i64, m64 = mib(mem64.get("idm")), mib(mem64.get("monai-ckpt"))
    i128 = _probe(sizes.get("idm", {}), 128).get("peak_growth_mib")
    m128 = _probe(sizes.get("monai-ckpt", {}), 128).get("peak_growth_mib")
    # ">=": the largest size probed fitted, so the true limit lies above it
    cubes = {net: ("≥ " if sizes[net].get("hit_max") else "") + f"{sizes[net].get('max_size')}³"
             for net in ("idm", "monai-ckpt", "patchddm-ckpt") if net in sizes}
    train = big_train.get("idm", {})
    # the in-place no-grad call (issue 29) where measured; PatchDDM-3D's from the same command's table
    after = {r["net"]: r for r in load("sampling-256.jsonl")}
    i256, p256 = mib(after.get("idm") or infer.get("idm")), mib(infer.get("patchddm"))
    step512 = next(iter(load("sampling-512-step.jsonl")), {})
    rows = [
        ["training step, 64³: peak memory vs MONAI `DiffusionModelUNet` checkpointed",
         f"{fmt(i64, ',.0f')} vs {fmt(m64, ',.0f')} MiB", ratio(i64, m64), "[memory-64](docs/bench/memory-64.md)"],
        ["training step, 128³: peak memory vs MONAI checkpointed",
         f"{fmt(i128, ',.0f')} vs {fmt(m128, ',.0f')} MiB", ratio(i128, m128), "[max-size](docs/bench/max-size.md)"],
        ["largest trainable cube within 21 GiB: IDMUNet / MONAI ckpt / PatchDDM-3D ckpt",
         " / ".join(cubes.values()), "", "[max-size](docs/bench/max-size.md)"],
        ["one 256³ training step on 2 CPU cores",
         f"{fmt(train.get('first_step_s'), '.0f')} s, {fmt(mib(train) and mib(train) / gib, '.1f')} GiB", "",
         "[idm-256](docs/bench/idm-256.md)"],
        ["one 256³ denoiser call (sampling) vs PatchDDM-3D",
         f"{fmt(i256, ',.0f')} vs {fmt(p256, ',.0f')} MiB", ratio(i256, p256),
         "[inference-256](docs/bench/inference-256.md), [sampling-256](docs/bench/sampling-256.md)"],
    ]
    def largest(name: str) -> str:
        """IDMUNet / MONAI / PatchDDM-3D's largest cube of one max-size file; IDMUNet's GiB and time there."""
        found = {r["net"]: r for r in load(name)}
        cubes = [("≥ " if found[n].get("hit_max") else "") + (f"{found[n]['max_size']}³" if found[n].get("max_size")
                 else "none") for n in ("idm", "monai", "patchddm") if n in found]
        at = _probe(found.get("idm", {}), found.get("idm", {}).get("max_size"))
        if cubes and at.get("peak_growth_mib") is not None:
            cubes[0] += f" ({at['peak_growth_mib'] / gib:.1f} GiB, {fmt(at.get('first_step_s'), '.0f')} s)"
        return " / ".join(cubes)

    if load("max-size-inference.jsonl"):
        rows.append(["largest cube one no-grad call fits within 21 GiB: IDMUNet / MONAI / PatchDDM-3D",
                     largest("max-size-inference.jsonl"), "", "[max-size-inference](docs/bench/max-size-inference.md)"])
    if load("max-size-sampling-step.jsonl"):
        rows.append(["largest sampled cube within 21 GiB (one DDIM step): IDMUNet / MONAI / PatchDDM-3D",
                     largest("max-size-sampling-step.jsonl"), "",
                     "[max-size-sampling-step](docs/bench/max-size-sampling-step.md)"])
    if step512 and not load("max-size-sampling-step.jsonl"):
        measured = f"{step512['size']}³: {step512.get('status')}"
        if step512.get("status") == "ok":
            measured = (f"{step512['size']}³, {fmt(mib(step512) and mib(step512) / gib, '.1f')} GiB, "
                        f"{fmt(step512.get('first_step_s'), '.0f')} s")
        label = "largest sampled cube (largest measured): one whole-volume DDIM step of IDMUNet within 21 GiB"
        rows.append([label, measured, "", "[sampling-512-step](docs/bench/sampling-512-step.md)"])
    machine = next(iter(mem64.values())).get("machine", {})
    head = (f"CPU only so far ({machine.get('cpu_cores', '?')} cores, torch {machine.get('torch', '?')}, fp32, "
            "batch 1, one fresh process per configuration); no GPU figure exists yet.")
    return head + "\n\n" + table(["figure", "measured", "ratio", "data and command"], rows)


def render() -> str:
    parts = [
        goals(),
        training("memory-64.jsonl"),
        training("memory-128.jsonl"),
        flops(),
        malloc(),
        big(),
        *(max_size(name) for name in MAX_SIZE),
        inference(),
        sampling(),
    ]
    return "\n\n".join(p for p in parts if p)


def rendered() -> dict[str, str]:
    """Each file's marked block as it should read."""
    return {"docs/measurements.md": render(), "README.md": summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print instead of rewriting the files")
    args = parser.parse_args(argv)
    for name, text in rendered().items():
        if args.print:
            print(f"## {name}\n\n{text}\n")
            continue
        begin, end = BLOCKS[name]
        path = ROOT / name
        content = path.read_text()
        if begin not in content or end not in content:
            print(f"{name} has no {begin} ... {end} block", file=sys.stderr)
            return 1
        head, rest = content.split(begin, 1)
        _, tail = rest.split(end, 1)
        path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
