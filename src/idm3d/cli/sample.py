"""``idm3d sample``: generate a volume, or translate source modalities, with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample a volume from a trained run",
        description="Sample with a trained run (EMA weights by default). Translation runs need --condition, "
        "one NIfTI per source modality; the output keeps the condition's grid and affine. Writes OUT and a PNG "
        "of the three orthogonal mid-slices next to it.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder written by `idm3d train`")
    p.add_argument("--out", type=Path, required=True, help="output .nii.gz (with several targets: OUT_<target>)")
    p.add_argument("--condition", nargs="+", default=None, metavar="FILE",
                   help="source volume(s) in the run's source order, or MODALITY=FILE")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--eta", type=float, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--seed", type=int, help="RNG seed (default: the run's sample.seed)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint JSON of the run (default: the newest)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="unconditional runs: grid size (default: the training data's working grid)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="denoiser autocast precision (default: the run's sample.precision, normally fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from idm3d.training.generate import sample

    written = sample(
        args.run, args.out, args.condition, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
        use_ema=False if args.raw_weights else None, checkpoint=args.checkpoint, shape=args.shape, device=args.device,
        progress=not args.no_progress, precision=args.precision,
    )
    for path in written:
        print(path)
    return 0
