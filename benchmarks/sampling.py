"""``python -m benchmarks.sampling``: memory and time of whole-volume sampling, one pass per reverse step.

The nets are fully convolutional, so a run trained on patches (with coordinate channels) samples a grid
larger than any of its patches in one network call per step (docs/patches.md). For each cube edge in
``--sizes`` a fresh process builds the run's network - a trained run (``--run``) or, by default, the
architecture of ``--config`` (``configs/demo.yaml``) with ``data.patch.coordinates`` on, untrained weights
(memory and time do not depend on them) - and measures one DDIM reverse step of a translation (the
network on noise + source + coordinates, and the scheduler step) under ``torch.no_grad``: the first
step and a steady one, peak memory growth (process RSS on CPU, ``max_memory_allocated`` on CUDA), wall
and process CPU time. A chain of ``S`` steps costs about ``S`` times the steady step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.step_report import report
from idm3d.bench.harness import (
    Column,
    add_common_arguments,
    machine_info,
    measure_training_step,
    parse_sizes,
    progress,
    run_config,
)
from idm3d.errors import ConfigError

__all__ = ["add_arguments", "child", "find_config", "run"]

def find_config(path: str | Path | None) -> Path:
    """``path``, else the demo's config as the package ships it."""
    from idm3d.demo.pipeline import find_demo_config

    return Path(path) if path is not None else find_demo_config()


def _pipeline(config: dict[str, Any]) -> tuple[Any, Any, int, int]:
    from idm3d.runs.config import load_config
    from idm3d.runs.load import build_pipeline, load_run
    from idm3d.runs.model_factory import build_model, model_channels

    device = torch.device(config["device"])
    if config.get("run"):
        run = load_run(config["run"], device=device, steps=1, sampler="ddim")
        cfg, model, pipeline = run.config, run.model, run.pipeline
    else:
        cfg = load_config(config["config"], ["data.patch.coordinates=true"])
        in_ch, out_ch = model_channels(cfg.data)
        torch.manual_seed(0)
        model = build_model(cfg.model, in_ch, out_ch).to(device).eval()
        pipeline = build_pipeline(cfg, model, device)
    n_sources = len(cfg.data.sources) if cfg.data.task == "translate" else 0
    return cfg, pipeline, n_sources, len(cfg.data.targets)


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One cube edge: build the network and measure one reverse step (runs in a fresh process)."""
    from idm3d.runs.load import build_scheduler

    device = torch.device(config["device"])
    cfg, pipeline, n_sources, n_targets = _pipeline(config)
    size = int(config["size"])
    grid = (size, size, size)
    condition = torch.zeros(1, n_sources, *grid, device=device) if n_sources else None

    @torch.no_grad()
    def step() -> None:
        scheduler = build_scheduler(cfg, "ddim", 1)
        pipeline.sample((1, n_targets, *grid), condition, scheduler=scheduler,
                        generator=torch.Generator().manual_seed(0), device=device)

    result = measure_training_step(pipeline.model, step, device, warmup=0, repeats=config["repeats"],
                                   count_flops=False)
    result.update(voxels=size**3, coordinates=pipeline.coordinates, in_channels=n_targets + n_sources + 3 * int(
        pipeline.coordinates), parameters=sum(p.numel() for p in pipeline.model.parameters()))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m benchmarks.sampling``."""
    parser.add_argument("--sizes", default="128,256", help="cube edges, comma-separated (default 128,256)")
    parser.add_argument("--run", type=Path, help="a trained run (default: the --config architecture, untrained)")
    parser.add_argument("--config", type=Path, help="config whose network is measured (default configs/demo.yaml)")
    parser.add_argument("--repeats", type=int, default=1, help="steady steps timed after the first (default 1)")
    add_common_arguments(parser)


COLUMNS = (
    Column("size", "cube edge"),
    Column("status", "status"),
    Column("in_channels", "input channels"),
    Column("first_step_growth_mib", "first step: peak growth (MiB)", ".0f"),
    Column("first_step_s", "first step (s)", ".2f"),
    Column("steady_growth_mib", "steady: peak growth (MiB)", ".0f"),
    Column("step_s", "steady step (s)", ".2f"),
    Column("step_cpu_s", "steady step CPU (s)", ".2f"),
    Column("us_per_voxel", "steady µs / voxel", ".3f"),
)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m benchmarks.sampling``; prints markdown (or JSON lines with ``--json``)."""
    from idm3d.bench.harness import resolve_device

    if args.repeats < 1:
        raise ConfigError(f"--repeats: expected an integer >= 1, got {args.repeats}")
    sizes = parse_sizes(args.sizes, multiple=8)
    device = resolve_device(args.device)
    info = machine_info(device)
    source = {"run": str(args.run)} if args.run else {"config": str(find_config(args.config))}
    rows = []
    for size in sizes:
        progress(f"bench sampling: {size}^3 ...")
        config = {"bench": "sampling", "size": size, "device": device, "repeats": args.repeats,
                  "threads": args.threads, **source}
        row = run_config("benchmarks.sampling:child", config, timeout_s=args.timeout)
        if isinstance(row.get("step_s"), (int, float)):
            row["us_per_voxel"] = row["step_s"] / size**3 * 1e6
        rows.append(row)
    what = f"run {args.run}" if args.run else f"the network of {source['config']} with coordinate channels (untrained)"
    head = [
        "# Whole-volume sampling: one DDIM reverse step per cube edge", "",
        f"Network: {what}; one pass over the whole grid (no sliding window), torch.no_grad, batch 1.",
    ]
    notes = [
        "Peak growth: memory above what the process held before the step (RSS on CPU). A chain of S DDIM steps "
        "costs about S x the steady step.", "",
    ]
    return report(rows, args, info, COLUMNS, head, notes)


if __name__ == "__main__":
    from benchmarks import main

    sys.exit(main(sys.modules[__name__]))
