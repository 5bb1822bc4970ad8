"""``idm3d demo``: T1 -> T2 and T2 -> T1 on the MNI template; IDMUNet vs MONAI vs a linear map."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="T1 -> T2 and T2 -> T1 demo on the MNI template (what `make run` runs)",
        description="For each translation direction (T1 -> T2, T2 -> T1), train a small IDMUNet on training slabs "
        "of the MNI ICBM152 2009c template (an average brain, not a patient scan) for a fixed CPU-time budget "
        "(the directions train side by side, one process each), train MONAI's DiffusionModelUNet for the CPU "
        "time the IDMUNet used, sample the held-out axial band with both, score them (PSNR, SSIM, MAE inside the "
        "brain mask and over the whole band) next to a linear intensity map, and write report.md, report.json "
        "and PNG previews per direction into --out/<source>_to_<target>/ and the headline report.md / "
        "report.json with both directions into --out.",
    )
    p.add_argument("--out", type=Path, help="output folder (default runs/demo)")
    p.add_argument("--minutes", type=float, help="each IDMUNet's training budget in CPU minutes of its process "
                   "(default: the config's train.max_cpu_seconds); each MONAI baseline gets the CPU time its "
                   "IDMUNet used")
    p.add_argument("--directions", default="t1-t2,t2-t1", help="comma-separated: t1-t2 and/or t2-t1 (default both)")
    p.add_argument("--steps", type=int, help="cap on training steps of each net (quick looks, tests)")
    p.add_argument("--config", type=Path, help="demo config (default configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config option, e.g. --set sample.steps=20 (repeatable)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default: the config's train.device)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo's outputs in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars and stage messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from idm3d.demo.pipeline import run_demo

    args.out = args.out or Path("runs/demo")
    report = run_demo(
        args.out, config=args.config, overrides=args.overrides, minutes=args.minutes, steps=args.steps,
        device=args.device, overwrite=args.overwrite, progress=not args.no_progress,
        directions=[d.strip() for d in args.directions.split(",") if d.strip()],
    )
    print(f"report: {args.out / 'report.md'}")
    print(f"{'direction':<10} {'model':<8} {'PSNR brain':>10} {'SSIM brain':>10} {'PSNR band':>10} {'SSIM band':>10}")
    for d in report["directions"].values():
        direction = f"{d['sources'][0]}->{d['targets'][0]}"
        for label in ("idm", "monai", "linear"):
            row = d["metrics"][label]
            print(f"{direction:<10} {label:<8} {row['psnr_mask']:>10.2f} {row['ssim_mask']:>10.4f} "
                  f"{row['psnr']:>10.2f} {row['ssim']:>10.4f}")
    return 0
