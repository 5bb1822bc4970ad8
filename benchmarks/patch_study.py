"""``python -m benchmarks.patch_study``: what patch training buys in time to quality on the demo data, and its FLOPs.

The demo's T1 -> T2 translation (``configs/demo.yaml``, the embedded MNI templates) is trained four
ways, each in a fresh process with the same budget of training CPU seconds:

* ``full``: the whole axial extent of the grid at the held-out band's depth (X x Y x 16), no coordinates;
* ``patches``: fixed patches of half the in-plane edges (X/2 x Y/2 x 16), no coordinates;
* ``patches+coords``: the same patches with the three coordinate channels (``data.patch.coordinates``);
* ``mixed+coords``: Patch Diffusion's mix (``data.patch.schedule: mixed``: half the steps on the full
  grid, 30% at 1/2 and 20% at 1/4 of every edge) with coordinates;
* ``mixed`` (not run by default): the mix without coordinates, to tell the mix's effect from theirs.

Each process first probes its configuration: per patch size of its schedule, the FLOPs of one training
step (forward + backward, ``torch.utils.flop_counter``) and the process CPU time of a steady step (which
only spaces the ``--points`` checkpoints). The trainer then trains until the budget of training CPU
seconds is spent (``train.max_cpu_seconds``: every configuration gets the same CPU time, whatever its
steps cost), keeping every checkpoint, and each is scored on the held-out band by
:func:`idm3d.inference.evaluation.evaluate_run` (SSIM and PSNR inside the brain mask, the run's 10-step
DDIM): held-out SSIM against training CPU time. ``--seeds`` repeats every configuration per training
seed; the goals are judged per seed and over the seeds (``patch_report``).

Separately, training FLOPs per voxel of PatchDDM-3D (``bench.nets`` ``patchddm``, 8 input channels, its
128^3 patch, counted on the meta device) and of IDMUNet (the study's network with 5 input channels, and
IDMUNet's own defaults) on the same 128^3 patch, each in a fresh process. The report
(``report.json``, ``report.md``, ``curves.png``) states each goal of docs/patches.md as met or missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.objectives import DDPM_DEMO
from benchmarks.sampling import find_config
from idm3d.bench.harness import add_common_arguments, machine_info, measure_training_step, progress, run_config
from idm3d.errors import ConfigError

__all__ = ["CONFIGS", "add_arguments", "flops_child", "run", "study_config", "train_child"]

# name -> (description, patch size: "full" | "half", coordinates, schedule)
CONFIGS: dict[str, tuple[str, str, bool, str]] = {
    "full": ("full grid (whole axial extent)", "full", False, "fixed"),
    "patches": ("fixed patches (1/2 in-plane edges)", "half", False, "fixed"),
    "patches+coords": ("fixed patches + coordinates", "half", True, "fixed"),
    "mixed+coords": ("Patch Diffusion mix + coordinates", "full", True, "mixed"),
    "mixed": ("Patch Diffusion mix, no coordinates (ablation)", "full", False, "mixed"),
}
DEFAULT_CONFIGS = ("full", "patches", "patches+coords", "mixed+coords")  # the four
FLOP_NETS = ("patchddm", "idm-study", "idm")
DEFAULT_CPU_SECONDS = 240.0
DEFAULT_POINTS = 5
FLOPS_SIZE = 128  # PatchDDM-3D's training patch edge
KEEP_ALL = 10**6  # train.keep_checkpoints: every checkpoint is a point of the curve


def study_config(
    base: Any, name: str, cpu_seconds: float, every: int, seed: int | None = None, split: str = "below"
) -> Any:
    """``base`` (the demo config) as configuration ``name`` of the study: trained for ``cpu_seconds`` of
    process CPU time (``train.max_cpu_seconds``), a kept checkpoint every ``every`` steps (``seed``:
    ``train.seed`` - initial weights, patches, noise - instead of the base config's; ``split``:
    ``data.demo_split``, training slabs below the held-out band or around it)."""
    from idm3d.runs.config import PatchConfig
    from idm3d.runs.data_source import DemoSource
    from idm3d.runs.model_factory import required_multiple

    _, size, coordinates, schedule = CONFIGS[name]
    demo = DemoSource(base).demo
    x, y, _ = demo.record.image.shape[1:]
    depth = len(demo.test_slices)
    multiple = required_multiple(base.model)
    patch = [x, y, depth] if size == "full" else [x // 2 // multiple * multiple, y // 2 // multiple * multiple, depth]
    data = dataclasses.replace(base.data, patch_size=patch, patch=PatchConfig(coordinates, schedule),
                               demo_split=split)
    train = dataclasses.replace(
        base.train, max_steps=None, max_seconds=None, max_cpu_seconds=float(cpu_seconds),
        checkpoint_every=max(1, int(every)), keep_checkpoints=KEEP_ALL,
        seed=base.train.seed if seed is None else int(seed),
        progress=False, log=dataclasses.replace(base.train.log, tensorboard=False),
    )
    return dataclasses.replace(base, data=data, train=train)


def _probe(cfg: Any) -> list[dict[str, Any]]:
    """Per patch size of the schedule: FLOPs and steady process CPU seconds of one forward + backward."""
    from idm3d.data.patch_schedule import PatchSchedule
    from idm3d.diffusion.schedule import sample_timesteps
    from idm3d.runs.data_source import data_source
    from idm3d.runs.load import build_pipeline
    from idm3d.runs.model_factory import build_model, model_channels

    sampler = data_source(cfg).prepare().data.sampler
    schedule = sampler.schedule
    torch.manual_seed(0)
    model = build_model(cfg.model, *model_channels(cfg.data))
    pipeline = build_pipeline(cfg, model, torch.device("cpu"))
    out = []
    for size, share in zip(schedule.sizes, schedule.shares):
        sampler.schedule = PatchSchedule.fixed(size)
        b = sampler.batch(0)
        gen = torch.Generator().manual_seed(0)
        batch = {"target": b["target"].float(), "source": b["source"].float(), "position": b["position"],
                 "noise": torch.randn(b["target"].shape, generator=gen),
                 "timesteps": sample_timesteps(pipeline.scheduler, b["target"].shape[0], gen)}

        def step(batch: dict = batch) -> None:
            pipeline.loss(batch, model).backward()

        m = measure_training_step(model, step, "cpu", warmup=1, repeats=2, count_flops=True)
        voxels = int(b["target"].shape[0]) * int(torch.tensor(size).prod())
        out.append({"size": list(size), "share": share, "voxels": voxels, "flops": m["flops"],
                    "step_cpu_s": m["step_cpu_s"], "first_step_cpu_s": m["first_step_cpu_s"]})
    sampler.schedule = schedule
    return out


def train_child(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration and seed: probe, train for the CPU budget, score every checkpoint (a fresh process)."""
    from idm3d.inference.evaluation import evaluate_run
    from idm3d.runs.config import load_config
    from idm3d.runs.rundir import RunDir
    from idm3d.training.trainer import Trainer

    name, points, budget = config["name"], int(config["points"]), float(config["cpu_seconds"])
    base = load_config(config["config"], config.get("overrides", []))
    seed, split = config.get("seed"), config.get("split", "below")
    probe = _probe(study_config(base, name, budget, 1, seed, split))
    cpu_per_step = sum(p["share"] * p["step_cpu_s"] for p in probe)
    # The probe only spaces the checkpoints; the trainer's own CPU clock ends the run.
    every = max(1, round(budget / cpu_per_step / points))
    cfg = study_config(base, name, budget, every, seed, split)
    run_dir = Path(config["out"])
    trainer = Trainer(cfg, run_dir)
    trainer.run()
    run = RunDir(run_dir)
    curve = []
    for path in run.list_checkpoints():
        state = run.read_state(path)
        step = state.step
        report = evaluate_run(run_dir, checkpoint=path, progress=False, device="cpu")
        summary = report["summary"][cfg.data.targets[0]]
        curve.append({"step": step, "cpu_s": state.cpu_s, "wall_s": state.elapsed_s,
                      "ssim_mask": summary["ssim_mask"]["mean"], "psnr_mask": summary["psnr_mask"]["mean"],
                      "mae_mask": summary["mae_mask"]["mean"]})
    steps, train_cpu = trainer.step, trainer.cpu
    flops = sum(p["share"] * p["flops"] for p in probe)
    voxels = sum(p["share"] * p["voxels"] for p in probe)
    return {
        "label": CONFIGS[name][0], "patch_size": cfg.data.patch_size, "coordinates": cfg.data.patch.coordinates,
        "schedule": cfg.data.patch.schedule, "seed": cfg.train.seed, "split": split, "probe": probe,
        "probe_cpu_s_per_step": cpu_per_step,
        "steps": steps, "budget_cpu_s": budget, "train_cpu_s": train_cpu, "cpu_s_per_step": train_cpu / steps,
        "flops_per_step": flops, "flops_per_voxel": flops / voxels, "voxels_per_step": voxels, "curve": curve,
        "final_ssim_mask": curve[-1]["ssim_mask"] if curve else None,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }


def flops_child(config: dict[str, Any]) -> dict[str, Any]:
    """Training FLOPs (forward + backward) of one network on a ``size^3`` patch, batch 1 (fresh process)."""
    from idm3d.bench.harness import count_step_flops

    size, net = int(config["size"]), config["net"]
    if net == "patchddm":
        from idm3d.bench.nets import build_net, in_channels

        # PatchDDM-3D has no data-dependent ops: the meta device counts its 128^3 step without computing it.
        device, channels = torch.device("meta"), in_channels(net)
        with device:
            model = build_net(net)
    else:
        from idm3d.nets.idm_unet import IDMUNet
        from idm3d.runs.config import load_config
        from idm3d.runs.model_factory import build_model, model_channels

        device = torch.device("cpu")  # IDMUNet's couplings read values (.item()): counted on real tensors
        if net == "idm-study":
            cfg = load_config(config["config"], ["data.patch.coordinates=true"])
            channels = model_channels(cfg.data)[0]
            model = build_model(cfg.model, channels, len(cfg.data.targets))
        else:
            channels = 8  # PatchDDM-3D's input: 4 modalities, 3 coordinates, the noisy target
            model = IDMUNet(in_channels=channels)
    x = torch.randn(1, channels, size, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    started = time.process_time()
    flops = count_step_flops(model, lambda: model(x, t).square().mean().backward())
    return {"in_channels": channels, "flops": flops, "flops_per_voxel": flops / size**3,
            "parameters": sum(p.numel() for p in model.parameters()), "count_cpu_s": time.process_time() - started}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m benchmarks.patch_study``."""
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the report")
    parser.add_argument("--config", type=Path, help="the base config (default configs/demo.yaml with the DDPM "
                        "objective of the committed study, benchmarks.objectives.DDPM_DEMO)")
    parser.add_argument("--cpu-seconds", type=float, default=DEFAULT_CPU_SECONDS,
                        help=f"training CPU seconds per configuration (default {DEFAULT_CPU_SECONDS:g})")
    parser.add_argument("--points", type=int, default=DEFAULT_POINTS,
                        help=f"evaluated checkpoints per configuration (default {DEFAULT_POINTS})")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"configurations, comma-separated, from {', '.join(CONFIGS)} "
                        f"(default {','.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--flops-size", type=int, default=FLOPS_SIZE,
                        help=f"cube edge of the FLOPs comparison with PatchDDM-3D (default {FLOPS_SIZE}; "
                        "a multiple of 64)")
    parser.add_argument("--seeds", default=None,
                        help="train.seed values, comma-separated: every configuration runs once per seed "
                        "(default: the config's, 0 in configs/demo.yaml)")
    parser.add_argument("--split", choices=("below", "around"), default="below",
                        help="training slabs (data.demo_split): below the held-out band, as the demo (default), "
                        "or below and above it, so that the band's coordinates lie inside the trained range")
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations trained side by side, one process each (default 1; CPU budgets "
                        "keep them comparable, but each job needs a core)")
    parser.add_argument("--no-flops", action="store_true", help="skip the 128^3 FLOPs comparison")
    add_common_arguments(parser, timeout_s=7200.0)


def _seeds(text: str | None) -> list[int | None]:
    if text is None:
        return [None]
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct integers, comma-separated, got {text!r}")
    return seeds


def _check(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise ConfigError(f"--configs: unknown configuration(s) {unknown} (known: {', '.join(CONFIGS)})")
    if not args.cpu_seconds > 0:
        raise ConfigError(f"--cpu-seconds: expected a number > 0, got {args.cpu_seconds}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs: expected an integer >= 1, got {args.jobs}")
    if args.points < 1:
        raise ConfigError(f"--points: expected an integer >= 1, got {args.points}")
    if args.flops_size < 64 or args.flops_size % 64:
        raise ConfigError(f"--flops-size: expected a positive multiple of 64 (PatchDDM-3D), got {args.flops_size}")
    if args.device != "cpu":
        raise ConfigError(f"--device: the study trains on CPU (CPU-second budgets), got {args.device!r}")
    return names


def run(args: argparse.Namespace) -> int:
    """Run the study; write ``report.json``, ``report.md`` and ``curves.png`` into ``--out``."""
    from benchmarks.patch_report import write_report

    names = _check(args)
    seeds = _seeds(args.seeds)
    config_path = str(find_config(args.config).resolve())
    overrides = DDPM_DEMO if args.config is None else []  # the committed study's objective: the demo's DDPM predecessor
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: not empty (the study trains fresh runs)")
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or 1
    info = machine_info("cpu")
    jobs = [(seed, name) for seed in seeds for name in names]

    def train(job: tuple[int | None, str]) -> dict[str, Any]:
        seed, name = job
        progress(f"bench patches: {name}, seed {'default' if seed is None else seed} ({args.cpu_seconds:g} CPU s "
                 f"of training, {threads} thread(s)) ...")
        folder = out / (name if seed is None else f"seed{seed}/{name}")
        config = {"bench": "patches", "name": name, "config": config_path, "overrides": overrides,
                  "out": str(folder.resolve()),
                  "cpu_seconds": args.cpu_seconds, "points": args.points, "threads": threads, "malloc": "system",
                  "seed": seed, "split": args.split}
        return run_config("benchmarks.patch_study:train_child", config, timeout_s=args.timeout)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job waits on its own child process
        results = list(pool.map(train, jobs))
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for (seed, name), row in zip(jobs, results):
        rows.setdefault("default" if seed is None else str(seed), {})[name] = row
    flops: dict[str, dict[str, Any]] = {}
    for net in () if args.no_flops else FLOP_NETS:
        progress(f"bench patches: training FLOPs of {net} at {args.flops_size}^3 ...")
        config = {"bench": "patches-flops", "net": net, "size": args.flops_size, "config": config_path,
                  "threads": threads, "malloc": "system"}
        flops[net] = run_config("benchmarks.patch_study:flops_child", config, timeout_s=args.timeout)
    command = " ".join(["python -m benchmarks.patch_study", f"--out {args.out}", f"--cpu-seconds {args.cpu_seconds:g}",
                        f"--points {args.points}", f"--threads {threads}"]
                       + ([f"--configs {args.configs}"] if names != list(DEFAULT_CONFIGS) else [])
                       + ([f"--seeds {args.seeds}"] if args.seeds is not None else [])
                       + ([f"--split {args.split}"] if args.split != "below" else [])
                       + ([f"--jobs {args.jobs}"] if args.jobs != 1 else [])
                       + (["--no-flops"] if args.no_flops else []))
    report = write_report(out, rows, flops, {"machine": info, "command": command, "config": config_path,
                                             "cpu_seconds": args.cpu_seconds, "flops_size": args.flops_size,
                                             "split": args.split})
    if args.json:
        print(json.dumps(report["goals"], indent=2))
    else:
        print((out / "report.md").read_text())
    return 0 if all(r.get("status") == "ok" for r in [*results, *flops.values()]) else 1


if __name__ == "__main__":
    from benchmarks import main

    sys.exit(main(sys.modules[__name__]))
