"""``idm3d bench memory``: IDMUNet against the U-Nets a user would pick instead, side by side.

Per volume size, network and allocator setting, a fresh process builds the network and measures
its first training step (forward, MSE, backward) and, after a warm-up, the steady state: peak
memory growth (CPU: RSS high-water mark; CUDA: ``max_memory_allocated``), wall and CPU time, FLOPs.
Baselines (:mod:`idm3d.bench.nets`): MONAI's ``DiffusionModelUNet`` widened to at least IDMUNet's
parameters, plain and with every block checkpointed, and PatchDDM-3D's published network, plain
and checkpointed. ``conv-stack`` (8 x Conv3d(32, 32, 3) + SiLU) measures what the machine's
convolutions deliver, the yardstick of the GFLOP/s ratio. ``--inference`` measures one no-grad
denoiser call instead (sampling), ``--inference --sampling-step`` one step of
``DiffusionPipeline.sample`` (the chain's x_t buffer, the call, the DDIM update). ``--malloc tuned,system``
repeats each row with glibc's default allocator thresholds (see :mod:`idm3d.allocator`). Every row is
compared with every baseline. Peaks are also given in T, one 32-channel full-resolution fp32 map
(IDMUNet's state at full resolution), the unit of the training tables.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler

from idm3d.allocator import SETTINGS
from idm3d.bench.compare import COLUMNS, add_ratios, markdown, plot_rows
from idm3d.bench.harness import (
    add_common_arguments,
    count_step_flops,
    emit,
    machine_info,
    measure_training_step,
    parse_sizes,
    progress,
    resolve_device,
    run_config,
)
from idm3d.bench.nets import NET_LABELS, build_net, in_channels, parse_nets, size_multiple, size_parameters
from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.errors import ConfigError
from idm3d.nets.baselines import count_parameters

__all__ = ["COLUMNS", "add_arguments", "child", "inference_mode", "run", "sampling_step"]

DEFAULT_NETS = "idm,idm-plain,monai,monai-ckpt,patchddm,patchddm-ckpt,conv-stack"


def _count_flops(config: dict[str, Any], step_on: Any) -> int | None:
    """FLOPs of one step, counted on the meta device where the network allows (no compute)."""
    try:
        return count_step_flops(*step_on("meta"))
    except (RuntimeError, NotImplementedError):  # data-dependent code (IDMUNet's resampling)
        return count_step_flops(*step_on(config["device"]))


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Build one network and measure one training step or denoiser call (runs in a fresh process)."""
    device = torch.device(config["device"])
    size, batch, name = config["size"], config["batch"], config["net"]
    mode = config.get("mode", "train")
    infer = mode in ("inference", "sampling-step")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.get("precision", "fp32"))

    def step_on(where: str | torch.device) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(0)
        net = build_net(name, config.get("monai_channels")).to(where)
        with torch.device(where):
            x = torch.randn(batch, in_channels(name), size, size, size)
            noise = torch.randn(batch, getattr(net, "out_channels", 1), size, size, size)
            timesteps = torch.randint(0, 1000, (batch,))

        def step() -> None:
            cast = torch.autocast(torch.device(where).type, dtype=dtype) if dtype is not None else nullcontext()
            with cast:
                if mode == "sampling-step":
                    sampling_step(net, x, timesteps)
                    return
                if infer:
                    with torch.no_grad():
                        net(x, timesteps)
                    return
                out = net(x, timesteps)
            F.mse_loss(out.float(), noise).backward()

        return net, step

    if config.get("flops_only"):
        net, _ = step_on("meta")
        return {"flops": _count_flops(config, step_on), "parameters": count_parameters(net)}
    net, step = step_on(device)
    budget = config.get("budget_bytes")
    if device.type == "cuda" and budget:
        # Make the caching allocator fail at the budget instead of filling the whole GPU.
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (torch.cuda.memory_allocated(device) + budget) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    result = measure_training_step(
        net,
        step,
        device,
        warmup=config.get("warmup", 1),
        repeats=config.get("repeats", 3),
        min_time_s=config.get("min_time_s", 0.0),
        count_flops=False,
    )
    if config.get("count_flops", True):
        del step
        try:
            result["flops"] = _count_flops(config, step_on)
        except RuntimeError as err:  # a counting failure must not discard the measurements
            result["flops_error"] = str(err).splitlines()[0]
    result["parameters"] = count_parameters(net)
    return result


def sampling_step(net: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor) -> None:
    """One step of ``DiffusionPipeline.sample`` (DDIM, 50 steps, the first), the network's other input
    channels a condition: its noise and x_t buffer, the network call and the update count as growth."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(50)
    scheduler.timesteps = scheduler.timesteps[:1]  # the chain's first step only
    target = getattr(net, "out_channels", 1)
    # the network's further input channels are a condition, a view of the inputs built before the baseline
    condition = x[:, target:] if x.shape[1] > target else None
    shape = (x.shape[0], target, *x.shape[2:])
    DiffusionPipeline(net, scheduler).sample(shape, condition, generator=torch.Generator().manual_seed(0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``idm3d bench memory``."""
    parser.add_argument("--sizes", default="32,64", help="cube edge lengths, multiples of 8 (default 32,64)")
    parser.add_argument(
        "--nets",
        default=DEFAULT_NETS,
        help=f"networks to compare (default {DEFAULT_NETS}; known: {', '.join(NET_LABELS)})",
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="fp32, or autocast to bf16/fp16"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steady steps per configuration (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="steps before the steady-state one, the first included (default 1)"
    )
    parser.add_argument(
        "--inference", action="store_true", help="one no-grad denoiser call (sampling) instead of a training step"
    )
    parser.add_argument(
        "--sampling-step",
        action="store_true",
        help="with --inference: one step of the sampling chain (x_t, the call, the update) instead of a bare call",
    )
    parser.add_argument(
        "--malloc",
        default="tuned",
        help="comma list of allocator settings to compare: tuned (the CLI's, idm3d.allocator) and/or system "
        "(glibc defaults) (default tuned)",
    )
    parser.add_argument(
        "--max-growth-gib",
        type=float,
        default=None,
        help="CPU: kill a configuration whose memory grows past this (status over_budget), so one "
        "run cannot push a shared machine into swap",
    )
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count FLOPs and parameters only (on the meta device where the network allows: no compute)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of memory and time per size")
    add_common_arguments(parser)


def inference_mode(args: argparse.Namespace) -> str:
    """The row mode: ``train``, ``inference`` (one no-grad call) or ``sampling-step``."""
    if getattr(args, "sampling_step", False) and not args.inference:
        raise ConfigError("--sampling-step: needs --inference")
    if not args.inference:
        return "train"
    return "sampling-step" if getattr(args, "sampling_step", False) else "inference"


def _mallocs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in SETTINGS for n in names):
        raise ConfigError(f"--malloc: expected a comma list of {'/'.join(SETTINGS)}, got {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    """Run ``idm3d bench memory``; prints markdown (or JSON lines with ``--json``)."""
    sizes = parse_sizes(args.sizes)
    nets = parse_nets(args.nets)
    mallocs = _mallocs(args.malloc)
    if args.batch < 1 or args.repeats < 0 or args.warmup < 0:
        raise ConfigError(
            f"--batch must be >= 1, --repeats/--warmup >= 0, got {args.batch}/{args.repeats}/{args.warmup}"
        )
    device = resolve_device(args.device)
    info = machine_info(device)
    sizing, note = size_parameters()
    if note:
        progress(f"bench memory: {note}")
    mode = inference_mode(args)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for net in nets:
            for malloc in mallocs:
                config = {
                    "bench": "memory",
                    "mode": mode,
                    "net": net,
                    "label": NET_LABELS[net],
                    "size": size,
                    "batch": args.batch,
                    "device": device,
                    "precision": args.precision,
                    "malloc": malloc,
                    "warmup": args.warmup,
                    "repeats": args.repeats,
                    "min_time_s": 1.0 if device.startswith("cuda") else 0.0,
                    "threads": args.threads,
                    "count_flops": not args.no_flops,
                    "flops_only": args.flops_only,
                    "max_growth_gib": args.max_growth_gib,
                    "monai_channels": sizing["monai_channels"] if net.startswith("monai") else None,
                }
                if size % size_multiple(net):
                    rows.append(
                        {
                            **config,
                            "status": "skipped",
                            "error": f"needs edges that are multiples of {size_multiple(net)}",
                        }
                    )
                    continue
                progress(f"bench memory: {NET_LABELS[net]}, {size}^3, malloc {malloc}, {mode} ...")
                limit = None if args.max_growth_gib is None else int(args.max_growth_gib * 2**30)
                rows.append(
                    run_config("idm3d.bench.memory:child", config, timeout_s=args.timeout, growth_limit_bytes=limit)
                )
    add_ratios(rows)
    for r in rows:
        r["machine"] = info
        r.update(sizing)
    emit(rows, markdown(rows, args, info, sizing, note), args)
    if args.plot is not None:
        plot_rows(rows, sizes, nets, args.plot, info)
        progress(f"bench memory: wrote {args.plot}")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in rows) else 1
