"""The measurement tables of docs/measurements.md from ``idm3d bench memory`` and ``max-size`` runs: training
steps, FLOPs, allocators, huge pages, the largest cube, no-grad calls and sampling (issue 29)."""

from __future__ import annotations

from benchmarks.tables_common import COMMANDS, MAX_SIZE, SHORT, fmt, load, table

__all__ = ["big", "flops", "inference", "malloc", "max_size", "sampling", "training"]


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
