"""``idm3d train``: train a diffusion model (generation or modality translation) from a config file."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from idm3d.errors import ConfigError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a diffusion model",
        description="Train a 3D diffusion model. Options come from --config (YAML or JSON) and --set overrides; "
        "the run folder receives config.yaml, checkpoints/, metrics.jsonl, loss.png and, when the tensorboard "
        "package is installed, TensorBoard event files with sample previews (tensorboard --logdir runs/; "
        "train.log.tensorboard=false turns them off). With train.max_seconds the progress bar shows the time "
        "used/budget and an ETA. For data-parallel "
        "training run it under torchrun (torchrun --nproc_per_node N -m idm3d train ...) or pass --nproc N.",
    )
    p.add_argument("--config", type=Path, help="YAML or JSON config (sections data, model, diffusion, train, sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<task>-<time>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], metavar="auto",
                   help="continue the run in --out from its last complete checkpoint (config defaults to the run's); "
                   "--resume auto: start the run when --out holds no checkpoint, continue it when it does, refuse "
                   "one trained with another config (the command for job scripts: docs/failure-modes.md). "
                   "train.stop_signals (default TERM, INT) stop after the current step with a checkpoint and "
                   "exit code 75")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="fp32, or bf16/fp16 autocast with the invertible state in fp32 (sets train.precision)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel in N local processes (reruns this command through torchrun)")
    p.set_defaults(func=run)


def _relaunch_argv(args: argparse.Namespace) -> list[str]:
    """This command's arguments for each torchrun process (without --nproc)."""
    argv = ["--debug"] if getattr(args, "debug", False) else []
    argv.append("train")
    if args.config is not None:
        argv += ["--config", str(args.config)]
    for item in args.overrides:
        argv += ["--set", item]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    if args.resume:
        argv += ["--resume"] + (["auto"] if args.resume == "auto" else [])
    if args.precision is not None:
        argv += ["--precision", args.precision]
    return argv


def run(args: argparse.Namespace) -> int:
    from idm3d.runs.config import load_config
    from idm3d.runs.rundir import CONFIG
    from idm3d.training.distributed import launcher_argv
    from idm3d.training.stopping import EXIT_STOPPED, TrainingStopped
    from idm3d.training.trainer import train

    if args.nproc is not None and args.nproc != 1:
        if "WORLD_SIZE" in os.environ:
            raise ConfigError("--nproc: already running under torchrun; drop --nproc (torchrun sets the processes)")
        return subprocess.call(launcher_argv(args.nproc, _relaunch_argv(args)))
    config_path = args.config
    if config_path is None and args.resume:
        if args.out is None:
            raise ConfigError("--resume: name the run folder with --out")
        config_path = args.out / CONFIG
        if args.resume == "auto" and not config_path.is_file():
            raise ConfigError(f"--resume auto: {args.out} holds no run yet; pass --config to start it")
    overrides = [*args.overrides, *([f"train.precision={args.precision}"] if args.precision else [])]
    cfg = load_config(config_path, overrides)
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        run_dir = train(cfg, args.out, resume=args.resume)
    except TrainingStopped as stop:
        if main:
            print(f"idm3d: {stop}", file=sys.stderr)
        return EXIT_STOPPED  # "try again later": a job script requeues on it
    if main:
        print(f"run folder: {run_dir}")
    return 0
