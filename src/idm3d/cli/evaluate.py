"""``idm3d evaluate``: PSNR / SSIM / MAE of a trained run on its held-out cases (optionally vs a baseline)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a run on its held-out cases",
        description="Sample every held-out case of a run and report PSNR, 3D SSIM and MAE per target modality, "
        "inside the brain mask and over the whole volume. Writes eval-<split>.json and .md in the run folder. "
        "--baseline also trains a MONAI DiffusionModelUNet with the run's config and time budget (in "
        "<run>/baseline) and reports both side by side.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder written by `idm3d train`")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which part of the split")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"), help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--eta", type=float, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--seed", type=int, help="RNG seed (case i uses seed + i)")
    p.add_argument("--average", type=int, metavar="K",
                   help="score the mean of K chains from different noise (default: the run's sample.average)")
    p.add_argument("--max-cases", type=int, help="evaluate at most this many cases")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--baseline", action="store_true", help="also train/evaluate a same-budget MONAI baseline")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from idm3d.inference.evaluation import evaluate

    evaluate(
        args.run, args.split, baseline=args.baseline, progress=not args.no_progress, sampler=args.sampler,
        steps=args.steps, eta=args.eta, seed=args.seed, max_cases=args.max_cases,
        average=args.average,
        use_ema=False if args.raw_weights else None, device=args.device,
    )
    name = f"eval-{args.split}-vs-baseline.md" if args.baseline else f"eval-{args.split}.md"
    print((args.run / name).read_text(encoding="utf-8"), end="")
    return 0
