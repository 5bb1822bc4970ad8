"""``idm3d sample``: generate volumes, or translate source modalities, with a trained run (one or a batch)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from idm3d.errors import ConfigError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample volumes from a trained run (one, or a folder of cases, or N)",
        description="Sample with a trained run (EMA weights by default). One volume: translation runs need "
        "--condition, one NIfTI per source modality; the output keeps the condition's grid and affine; OUT and a "
        "PNG of the three orthogonal mid-slices next to it are written. A batch: --input-dir DIR translates every "
        "case folder of DIR (modalities found by file-name suffix, as for training data) into the folder OUT, "
        "one NIfTI per case on its case's grid and affine; --num N writes N unconditional samples into OUT with "
        "seeds SEED, SEED+1, ... Batches record their settings and seeds in OUT/samples.json, skip outputs "
        "that already exist (rerun to resume), report a bad case in one line and go on with the others, and "
        "exit 1 if any case failed.",
    )
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN",
                   help="run folder written by `idm3d train` (or --run RUN; under torchrun give it here: "
                   "torchrun's own parser takes --run for its --run-path)")
    p.add_argument("--run", type=Path, help="run folder written by `idm3d train`")
    p.add_argument("--out", type=Path, required=True,
                   help="output .nii.gz, .nii, .nrrd, .nhdr, .mha or .mhd (with several targets: OUT_<target>); "
                   "a data.intensity ct run: a name without suffix writes a DICOM series folder; with "
                   "--input-dir/--num a folder")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--condition", nargs="+", default=None, metavar="FILE",
                        help="source volume(s) in the run's source order, or MODALITY=FILE (NIfTI, NRRD, "
                        "MetaImage, or a DICOM series folder)")
    inputs.add_argument("--input-dir", type=Path, metavar="DIR",
                        help="translation runs: translate every case folder of DIR into the folder OUT")
    inputs.add_argument("--num", type=int, metavar="N",
                        help="unconditional runs: write N samples (seeds SEED..SEED+N-1) into the folder OUT")
    p.add_argument("--out-format", default=None, metavar="F",
                   help="--input-dir/--num: nifti (default), nrrd, mha, dicom (CT runs) or input (each case's format)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"), help="default: the run's sample.sampler")
    p.add_argument("--steps", type=int, help="network calls per sample, whatever the sampler (heun: N//2+1 steps, "
                   "Heun steps of 2 calls between Euler ones; default: the run's sample.steps)")
    p.add_argument("--eta", type=float, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--seed", type=int, help="RNG seed (default: the run's sample.seed); --num: the first one")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint JSON of the run (default: the newest)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="unconditional runs: grid size (default: the training data's working grid)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="denoiser autocast precision (default: the run's sample.precision, normally fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--domain-parallel", type=int, metavar="R",
                   help="split the volume along its first axis across R processes: run under torchrun "
                   "--nproc_per_node R; rank 0 writes OUT (one volume only; the depth must be a multiple of "
                   "R x 2 ** (levels - 1))")
    p.set_defaults(func=run)


def _domain_ranks(args: argparse.Namespace) -> int:
    """``--domain-parallel`` checked against the launch: 1 without it, else R == torchrun's WORLD_SIZE."""
    ranks = args.domain_parallel
    if ranks is None or ranks == 1:
        return 1
    if ranks < 1:
        raise ConfigError(f"--domain-parallel: expected an integer >= 1, got {ranks}")
    if args.input_dir is not None or args.num is not None:
        raise ConfigError("--domain-parallel: samples one volume; drop --input-dir/--num")
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise ConfigError(f"--domain-parallel {ranks}: not launched by torchrun; run "
                          f"torchrun --nproc_per_node {ranks} -m idm3d sample ...")
    if world != str(ranks):
        raise ConfigError(f"--domain-parallel {ranks}: needs exactly {ranks} processes (torchrun --nproc_per_node "
                          f"{ranks}), got WORLD_SIZE={world}")
    return ranks


def _run_sharded(args: argparse.Namespace) -> int:
    """One volume, its chain split by depth over the torchrun processes; rank 0 writes and prints."""
    from idm3d.inference.domain_sample import write_sample_sharded
    from idm3d.runs.load import load_run
    from idm3d.training.distributed import setup, shutdown

    ctx = setup(args.device)
    clean = False
    try:
        loaded = load_run(
            args.run, checkpoint=args.checkpoint, use_ema=False if args.raw_weights else None, device=ctx.device,
            sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, precision=args.precision,
        )
        paths = write_sample_sharded(loaded, args.out, args.condition, shape=args.shape,
                                     progress=not args.no_progress)
        clean = True
    finally:
        shutdown(clean)  # after an error another rank may be inside a collective: no barrier then
    if ctx.is_main:
        for path in paths:
            print(path)
    return 0


def run(args: argparse.Namespace) -> int:
    from idm3d.data.readers import is_volume_name
    from idm3d.runs.load import load_run

    if (args.run is None) == (args.run_dir is None):
        raise ConfigError("--run: give the run folder once, as RUN or as --run RUN")
    args.run = args.run if args.run is not None else args.run_dir
    if args.num is not None and args.num < 1:
        raise ConfigError(f"--num: expected a count >= 1, got {args.num}")
    batch = args.input_dir is not None or args.num is not None
    if batch and is_volume_name(args.out.name):
        raise ConfigError(f"--out {args.out}: with --input-dir or --num, OUT is a folder (got a volume file name)")
    if args.out_format is not None and not batch:
        raise ConfigError("--out-format: only with --input-dir or --num; one sample's format is --out's suffix")
    if args.input_dir is not None and args.shape is not None:
        raise ConfigError("--shape: a translation keeps each case's grid; drop --shape with --input-dir")
    if _domain_ranks(args) > 1:
        return _run_sharded(args)
    loaded = load_run(
        args.run, checkpoint=args.checkpoint, use_ema=False if args.raw_weights else None, device=args.device,
        sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, precision=args.precision,
    )
    progress = not args.no_progress
    if not batch:
        from idm3d.inference.generate import write_sample

        for path in write_sample(loaded, args.out, args.condition, shape=args.shape, progress=progress):
            print(path)
        return 0
    from idm3d.inference.batch import MANIFEST, sample_folder, sample_many

    out_format = args.out_format or "nifti"

    if args.input_dir is not None:
        result = sample_folder(loaded, args.input_dir, args.out, progress=progress, out_format=out_format)
    else:
        result = sample_many(loaded, args.num, args.out, shape=args.shape, progress=progress, out_format=out_format)
    for path in result.written:
        print(path)
    print(f"idm3d: {result.summary()}; settings and seeds in {result.out_dir / MANIFEST}", file=sys.stderr)
    if result.failed:
        print(f"idm3d: error: {len(result.failed)} case(s) failed: {', '.join(result.failed)}", file=sys.stderr)
        return 1
    return 0
