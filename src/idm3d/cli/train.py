"""``idm3d train``: train a diffusion model (generation or modality translation) from a config file."""

from __future__ import annotations

import argparse
from pathlib import Path

from idm3d.errors import ConfigError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a diffusion model",
        description="Train a 3D diffusion model. Options come from --config (YAML or JSON) and --set overrides; "
        "the run folder receives config.yaml, checkpoints/, metrics.jsonl and loss.png.",
    )
    p.add_argument("--config", type=Path, help="YAML or JSON config (sections data, model, diffusion, train, sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<task>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last complete checkpoint (config defaults to the run's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from idm3d.training.config import load_config
    from idm3d.training.run import CONFIG
    from idm3d.training.trainer import train

    config_path = args.config
    if config_path is None and args.resume:
        if args.out is None:
            raise ConfigError("--resume: name the run folder with --out")
        config_path = args.out / CONFIG
    cfg = load_config(config_path, args.overrides)
    run_dir = train(cfg, args.out, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0
