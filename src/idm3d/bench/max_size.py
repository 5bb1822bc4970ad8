"""``idm3d bench max-size``: the largest cube each network can train on (or sample) within a memory budget.

``--inference`` probes one no-grad denoiser call, ``--inference --sampling-step`` one step of the
sampling chain (:func:`idm3d.bench.memory.sampling_step`), instead of a training step.

For every network the edge length (a multiple of 16, of 64 for PatchDDM-3D) is bisected; each probe is one training step
in a fresh process, and it fits when the step's peak memory growth stays under the budget. On CPU
a watchdog in this process kills a probe whose RSS passes its baseline plus the budget, so a probe
never drives the machine into swap or the OOM killer. On CUDA the probe's allocator is capped at
its baseline plus the budget, and an out-of-memory error counts as "does not fit".
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from idm3d.bench.harness import (
    GIB,
    Column,
    add_common_arguments,
    emit,
    machine_info,
    machine_markdown,
    markdown_table,
    parse_sizes,
    progress,
    resolve_device,
    run_config,
)
from idm3d.bench.memory import inference_mode
from idm3d.bench.nets import NET_LABELS, parse_nets, size_multiple, size_parameters
from idm3d.children import machine_available_bytes
from idm3d.errors import ConfigError

__all__ = ["STEP", "add_arguments", "bisect_max", "run"]

STEP = 16  # sizes probed are multiples of this (IDMUNet and MONAI need multiples of 8)


def bisect_max(fits: Any, max_k: int) -> int:
    """Largest ``k`` in ``[1, max_k]`` with ``fits(k)`` (assumed monotone), or 0 when none fits."""
    lo, hi = 0, max_k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    return machine_available_bytes()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``idm3d bench max-size``."""
    parser.add_argument(
        "--budget-gib", type=float, required=True, help="memory budget of one training step (or call) in GiB"
    )
    parser.add_argument("--inference", action="store_true", help="probe one no-grad denoiser call (sampling)")
    parser.add_argument(
        "--sampling-step", action="store_true", help="with --inference: one step of the sampling chain"
    )
    parser.add_argument(
        "--nets",
        default="idm,idm-plain,monai,monai-ckpt,patchddm,patchddm-ckpt",
        help="networks (default idm,idm-plain,monai,monai-ckpt,patchddm,patchddm-ckpt)",
    )
    parser.add_argument("--max", type=int, default=256, help=f"largest edge probed, multiple of {STEP} (default 256)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--sizes",
        default=None,
        help=f"probe only these edges (comma list, multiples of {STEP}; of 64 for PatchDDM-3D), smallest first "
        "up to the first that does not fit, instead of bisecting up to --max; e.g. --sizes 256 answers "
        "'does a 256^3 step fit?' in one probe",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up steps at the probed size before the measured one (default 1)"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="fp32, or autocast to bf16/fp16"
    )
    add_common_arguments(parser, timeout_s=1800.0)


def _check(args: argparse.Namespace) -> None:
    if args.budget_gib <= 0:
        raise ConfigError(f"--budget-gib: expected a number > 0, got {args.budget_gib}")
    if args.max < STEP or args.max % STEP:
        raise ConfigError(f"--max: expected a positive multiple of {STEP}, got {args.max}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if args.batch < 1:
        raise ConfigError(f"--batch: expected an integer >= 1, got {args.batch}")


def run(args: argparse.Namespace) -> int:
    """Run ``idm3d bench max-size``; prints markdown (or JSON lines with ``--json``)."""
    _check(args)
    mode = inference_mode(args)
    nets = parse_nets(args.nets)
    sizes = parse_sizes(args.sizes, "--sizes", multiple=STEP) if args.sizes else []
    device = resolve_device(args.device)
    budget = int(args.budget_gib * GIB)
    available = _available_bytes(device)
    if available is not None and budget > available:
        raise ConfigError(
            f"--budget-gib {args.budget_gib:g}: more than the {available / GIB:.1f} GiB available on {device}; "
            "probes would swap or be killed"
        )
    info = machine_info(device)
    sizing, note = size_parameters()
    if note:
        progress(f"bench max-size: {note}")
    rows: list[dict[str, Any]] = []
    for net in nets:
        probes: list[dict[str, Any]] = []
        unit = max(STEP, size_multiple(net))  # probed edges are multiples of this

        def fits(k: int, net: str = net, probes: list[dict[str, Any]] = probes, unit: int = unit) -> bool:
            config = {
                "bench": "max-size",
                "mode": mode,
                "net": net,
                "size": k * unit,
                "batch": args.batch,
                "device": device,
                "precision": args.precision,
                # One warm-up, as in ``bench memory``: the first step's one-off allocations
                # (kernel caches, autograd threads) are not what a training step needs.
                "warmup": args.warmup,
                "repeats": 0,
                "count_flops": False,
                "threads": args.threads,
                "budget_bytes": budget,
                "monai_channels": sizing["monai_channels"] if net.startswith("monai") else None,
            }
            progress(f"bench max-size: {NET_LABELS[net]} at {k * unit}^3 ...")
            limit = None if device.startswith("cuda") else budget
            result = run_config("idm3d.bench.memory:child", config, timeout_s=args.timeout, growth_limit_bytes=limit)
            growth = result.get("peak_growth_mib")
            ok = result.get("status") == "ok" and growth is not None and growth * 2**20 <= budget
            probes.append(
                {
                    "size": k * unit,
                    "fits": ok,
                    "status": result.get("status"),
                    "peak_growth_mib": growth,
                    "first_step_growth_mib": result.get("first_step_growth_mib"),
                    "first_step_s": result.get("first_step_s"),
                    "first_step_cpu_s": result.get("first_step_cpu_s"),
                    "error": result.get("error"),
                }
            )
            grown = "n/a" if growth is None else f"{growth:.0f} MiB"
            progress(f"  -> {'fits' if ok else 'does not fit'} ({result.get('status')}, growth {grown})")
            return ok

        if sizes:
            best, top = 0, max((x for x in sizes if x % unit == 0), default=0)
            for s in sorted(x for x in sizes if x % unit == 0):
                if not fits(s // unit):
                    break  # fitting is monotone in the size (as bisection assumes): larger ones fail too
                best = s
        else:
            best, top = bisect_max(fits, args.max // unit) * unit, args.max // unit * unit
        at_best = next((p for p in probes if p["size"] == best), {})
        rows.append(
            {
                "bench": "max-size",
                "mode": mode,
                "net": net,
                "label": NET_LABELS[net],
                "device": device,
                "budget_gib": args.budget_gib,
                "batch": args.batch,
                "precision": args.precision,
                "max_probed": top,
                "max_size": best or None,
                # the largest size asked about fits: the true limit may lie beyond it
                "hit_max": best > 0 and best == top,
                "peak_growth_mib_at_max": at_best.get("peak_growth_mib"),
                "probes": sorted(probes, key=lambda p: p["size"]),
                "machine": info,
                **sizing,
            }
        )
    emit(rows, _markdown(rows, args, info, note), args)
    return 0


_WHAT = {"train": "training step", "inference": "no-grad denoiser call", "sampling-step": "sampling step"}

COLUMNS = (
    Column("label", "network"),
    Column("max_cube", "largest cube"),
    Column("peak_growth_mib_at_max", "peak growth there (MiB)", ".1f"),
    Column("probed", "probes (size: growth MiB or failure)"),
)


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], note: str | None) -> str:
    table = []
    for r in rows:
        size = r["max_size"]
        cube = (f"{size}^3" if size else f"none >= {STEP}^3") + (" (largest probed)" if r["hit_max"] else "")
        probed = ", ".join(
            f"{p['size']}: {p['peak_growth_mib']:.0f}" if p["status"] == "ok" else f"{p['size']}: {p['status']}"
            for p in r["probes"]
        )
        table.append({**r, "max_cube": cube, "probed": probed})
    out = [
        f"## idm3d bench max-size: budget {args.budget_gib:g} GiB per {_WHAT[inference_mode(args)]}, "
        f"batch {args.batch}, "
        f"precision {args.precision}",
        "",
        machine_markdown(info),
        "",
        markdown_table(table, COLUMNS),
    ]
    if note:
        out += ["", f"- {note}"]
    return "\n".join(out)
