"""``idm3d bench memory``: IDMUNet against MONAI's DiffusionModelUNet, side by side.

Per volume size and network, one training step (forward, MSE to noise, backward) runs in a fresh
process: parameters, peak memory growth (CPU: RSS high-water mark; CUDA: ``max_memory_allocated``),
step time and FLOPs, each also as a ratio to MONAI. The MONAI baseline is widened until it has at
least as many parameters as the IDMUNet, so any memory saving is not bought with a smaller model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idm3d.bench.harness import (
    Column,
    add_common_arguments,
    emit,
    machine_info,
    machine_markdown,
    markdown_table,
    measure_training_step,
    parse_sizes,
    plot_grouped_bars,
    progress,
    ratio,
    resolve_device,
    run_config,
)
from idm3d.errors import ConfigError
from idm3d.nets.baselines import MONAI_BASE_CHANNELS, count_parameters, monai_channels_matching, monai_unet

__all__ = [
    "IDM_KWARGS",
    "MONAI_BASE_CHANNELS",
    "NET_LABELS",
    "add_arguments",
    "build_net",
    "child",
    "count_parameters",
    "monai_channels_matching",
    "parse_nets",
    "run",
    "size_parameters",
]

# The denoiser as the README trains it by default (common.md).
IDM_KWARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": 32,
    "levels": 4,
    "blocks_per_level": 2,
    "attention_levels": (False, False, True, True),
    "attention": "channel",
}
NET_LABELS: dict[str, str] = {
    "idm": "IDMUNet (memory-efficient)",
    "idm-plain": "IDMUNet (plain autograd)",
    "idm-nobookends": "IDMUNet (bookends=False)",
    "monai": "MONAI DiffusionModelUNet",
}
def build_net(name: str, monai_channels: tuple[int, ...] | list[int] | None = None) -> nn.Module:
    """Build one of ``NET_LABELS``' networks (1 input channel, 1 output channel)."""
    if name == "monai":
        return monai_unet(tuple(monai_channels or MONAI_BASE_CHANNELS))
    if name not in NET_LABELS:
        raise ConfigError(f"--nets: unknown network {name!r} (known: {', '.join(NET_LABELS)})")
    from idm3d.nets.idm_unet import IDMUNet

    return IDMUNet(**IDM_KWARGS, bookends=name != "idm-nobookends", memory_efficient=name in ("idm", "idm-nobookends"))


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Build one network and measure one training step (runs in a fresh process)."""
    device = torch.device(config["device"])
    torch.manual_seed(0)
    net = build_net(config["net"], config.get("monai_channels")).to(device)
    size, batch = config["size"], config["batch"]
    x = torch.randn(batch, 1, size, size, size, device=device)
    noise = torch.randn_like(x)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    budget = config.get("budget_bytes")
    if device.type == "cuda" and budget:
        # Make the caching allocator fail at the budget instead of filling the whole GPU.
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (torch.cuda.memory_allocated(device) + budget) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.get("precision", "fp32"))

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = net(x, timesteps)
        F.mse_loss(out.float(), noise).backward()

    result = measure_training_step(
        net,
        step,
        device,
        warmup=config.get("warmup", 1),
        repeats=config.get("repeats", 3),
        min_time_s=config.get("min_time_s", 0.0),
        count_flops=config.get("count_flops", True),
    )
    result["parameters"] = count_parameters(net)
    return result


def parse_nets(text: str) -> list[str]:
    """Parse ``--nets idm,monai`` (names from ``NET_LABELS``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NET_LABELS]
    if unknown or not names:
        raise ConfigError(f"--nets: expected names from {', '.join(NET_LABELS)}, got {text!r}")
    return names


def size_parameters() -> tuple[dict[str, Any], str | None]:
    """Parameter counts of the IDMUNet and the matching MONAI widths (or why IDMUNet is missing)."""
    note = None
    idm_params = None
    try:
        idm_params = count_parameters(build_net("idm"))
    except Exception as err:  # the benchmark still runs the MONAI rows
        note = f"IDMUNet unavailable ({type(err).__name__}: {err}); MONAI uses its base channels"
    channels, monai_params = monai_channels_matching(idm_params)
    return {"idm_params": idm_params, "monai_channels": list(channels), "monai_params": monai_params}, note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``idm3d bench memory``."""
    parser.add_argument("--sizes", default="32,64", help="cube edge lengths, multiples of 8 (default 32,64)")
    parser.add_argument(
        "--nets", default=",".join(NET_LABELS), help=f"networks to compare (default {','.join(NET_LABELS)})"
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="fp32, or autocast to bf16/fp16"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of memory and time per size")
    add_common_arguments(parser)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    monai = {r["size"]: r for r in rows if r["net"] == "monai"}
    for r in rows:
        base = monai.get(r["size"], {})
        for key, name in (
            ("parameters", "params"),
            ("peak_growth_mib", "growth"),
            ("step_s", "time"),
            ("flops", "flops"),
        ):
            r[f"{name}_vs_monai"] = ratio(r.get(key), base.get(key))
        if isinstance(r.get("flops"), int):
            r["gflops"] = r["flops"] / 1e9


COLUMNS = (
    Column("size", "size"),
    Column("label", "network"),
    Column("status", "status"),
    Column("parameters", "params", ","),
    Column("peak_growth_mib", "peak growth (MiB)", ".1f"),
    Column("step_s", "step (s)", ".3f"),
    Column("gflops", "GFLOP/step", ".1f"),
    Column("params_vs_monai", "params / MONAI", ".2f"),
    Column("growth_vs_monai", "memory / MONAI", ".2f"),
    Column("time_vs_monai", "time / MONAI", ".2f"),
    Column("flops_vs_monai", "FLOPs / MONAI", ".2f"),
    Column("energy_j_per_step", "J/step", ".2f"),
)


def run(args: argparse.Namespace) -> int:
    """Run ``idm3d bench memory``; prints markdown (or JSON lines with ``--json``)."""
    sizes = parse_sizes(args.sizes)
    nets = parse_nets(args.nets)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise ConfigError(
            f"--batch/--repeats must be >= 1 and --warmup >= 0, got {args.batch}/{args.repeats}/{args.warmup}"
        )
    device = resolve_device(args.device)
    info = machine_info(device)
    sizing, note = size_parameters()
    if note:
        progress(f"bench memory: {note}")
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for net in nets:
            config = {
                "bench": "memory",
                "net": net,
                "label": NET_LABELS[net],
                "size": size,
                "batch": args.batch,
                "device": device,
                "precision": args.precision,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "min_time_s": 1.0 if device.startswith("cuda") else 0.0,
                "threads": args.threads,
                "count_flops": not args.no_flops,
                "monai_channels": sizing["monai_channels"] if net == "monai" else None,
            }
            progress(f"bench memory: {NET_LABELS[net]}, {size}^3 ...")
            rows.append(run_config("idm3d.bench.memory:child", config, timeout_s=args.timeout))
    _add_ratios(rows)
    for r in rows:
        r["machine"] = info
        r.update(sizing)
    emit(rows, _markdown(rows, args, info, sizing, note), args)
    if args.plot is not None:
        _plot(rows, sizes, nets, args.plot, info)
        progress(f"bench memory: wrote {args.plot}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def _markdown(
    rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], sizing: dict, note: str | None
) -> str:
    out = [
        f"## idm3d bench memory: one training step, batch {args.batch}, precision {args.precision}",
        "",
        machine_markdown(info),
        "",
        f"IDMUNet {IDM_KWARGS['channels']} channels, {IDM_KWARGS['levels']} levels, "
        f"{IDM_KWARGS['blocks_per_level']} blocks/level: {_count(sizing['idm_params'])} parameters; "
        f"MONAI channels {tuple(sizing['monai_channels'])}, 2 res blocks, attention at the lowest level: "
        f"{_count(sizing['monai_params'])} parameters.",
        "",
        markdown_table(rows, COLUMNS),
    ]
    if note:
        out += ["", f"- {note}"]
    failed = [r for r in rows if r.get("status") != "ok"]
    for r in failed:
        out.append(f"- {r['label']} at {r['size']}^3: {r.get('status')}: {r.get('error')}")
    if any(r.get("memory_method") == "ru_maxrss" for r in rows):
        out.append("- CPU peak from ru_maxrss (VmHWM reset unavailable): growth measured on the first step")
    return "\n".join(out)


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _plot(rows: list[dict[str, Any]], sizes: list[int], nets: list[str], path: Path, info: dict) -> None:
    by = {(r["net"], r["size"]): r for r in rows}
    panels = {}
    for key, ylabel in (("peak_growth_mib", "peak memory growth (MiB)"), ("step_s", "step time (s)")):
        panels[ylabel] = {NET_LABELS[n]: [by[(n, s)].get(key) for s in sizes] for n in nets}
    where = info.get("gpu") or info.get("cpu_model")
    plot_grouped_bars(path, [f"{s}^3" for s in sizes], panels, f"One training step, {where}")
