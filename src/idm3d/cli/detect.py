"""``idm3d detect``: tell real from generated volumes with a trained run (``score``: one volume at a time).

Needs the ``detect`` extra (scikit-learn): ``pip install 'idm3d[detect]'``; without it the command stops with one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register", "run"]

_DESCRIPTION = (
    "Features of each volume through a trained run's denoiser (DDIM inversion and reconstruction error, "
    "statistics of the recovered noise, the one-step residual at a small timestep), a zero-shot score fitted on "
    "the real volumes only and a supervised classifier, cross-validated grouped by volume. Writes report.md, "
    "report.json (AUROC with bootstrap 95%% CIs, per-feature AUROCs), roc.png, features.csv and detector.json "
    "(for `idm3d detect score`) into --out. Translation runs take the sources as `idm3d sample` does "
    "(--condition), or find <case>_<source> next to each <case>_<target> file. See docs/detect.md."
)


def _common(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--run", type=Path, required=required, help="run folder written by `idm3d train`")
    p.add_argument("--condition", nargs="+", default=None, metavar="FILE",
                   help="translation runs: the source volume(s) shared by every volume, as for `idm3d sample`")
    p.add_argument("--steps", type=int, help="DDIM inversion steps (default: the run's sample.steps)")
    p.add_argument("--residual-t", type=int, help="timestep of the one-step residual (default: 5%% of the chain)")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint JSON of the run (default: the newest)")
    p.add_argument("--device", default="cpu", help="cpu, auto or cuda[:N]")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect", help="tell real from generated volumes with a trained run",
                              description=_DESCRIPTION)
    _common(p, required=False)
    p.add_argument("--real", nargs="+", default=None, metavar="PATH",
                   help="real volumes (NIfTI, NRRD, MetaImage or DICOM series folders)")
    p.add_argument("--fake", nargs="+", default=None, metavar="PATH", help="generated volumes (same formats as --real)")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (capped by the volumes)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws of the 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, the bootstrap and the residual noise")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="action", metavar="ACTION")

    s = sub.add_parser("score", help="score volumes one by one",
                       description="Print one line per volume: the zero-shot score (distance from the real volumes' "
                       "features; higher = less like them), its percentile among the calibration reals and, with a "
                       "--detector that holds one, the supervised probability of being generated.")
    _common(s, required=True)
    s.add_argument("files", nargs="*", metavar="FILE",
                   help="volumes to score (NIfTI, NRRD, MetaImage or DICOM series folders)")
    s.add_argument("--detector", type=Path, help="detector.json (or its folder) written by `idm3d detect`")
    s.add_argument("--real", nargs="+", default=None, metavar="PATH",
                   help="without --detector: real volumes to calibrate the zero-shot score on")
    s.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    s.set_defaults(func=run_score)



def _require_extra() -> None:
    """scikit-learn is an optional extra: without it, one line saying how to install it."""
    import importlib.util

    from idm3d.errors import ConfigError

    if importlib.util.find_spec("sklearn") is None:
        raise ConfigError("idm3d detect: needs scikit-learn, the 'detect' extra: pip install 'idm3d[detect]'")


def _settings(args: argparse.Namespace):
    from idm3d.detect.core import DetectSettings

    return DetectSettings(steps=args.steps, residual_timestep=args.residual_t, seed=getattr(args, "seed", 0))


def run(args: argparse.Namespace) -> int:
    _require_extra()
    from idm3d.detect.core import fit_detector
    from idm3d.errors import ConfigError

    for option, value in (("--run", args.run), ("--real", args.real), ("--fake", args.fake), ("--out", args.out)):
        if not value:
            raise ConfigError(f"{option}: required (idm3d detect --run RUN --real PATH... --fake PATH... --out DIR)")
    report = fit_detector(args.run, args.real, args.fake, args.out, conditions=args.condition,
                          settings=_settings(args), checkpoint=args.checkpoint, device=args.device, folds=args.folds,
                          n_boot=args.bootstrap, seed=args.seed, progress=not args.no_progress)
    for key, entry in report["evaluation"]["detectors"].items():
        print(f"{key}: AUROC {entry['auroc']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]")
    print(args.out / "report.md")
    return 0


def run_score(args: argparse.Namespace) -> int:
    _require_extra()
    from idm3d.detect.core import score_files

    rows = score_files(args.run, args.files, detector=args.detector, real=args.real, conditions=args.condition,
                       settings=_settings(args), checkpoint=args.checkpoint, device=args.device)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        extra = f"  p(generated) {row['probability_generated']:.3f}" if "probability_generated" in row else ""
        print(f"{row['file']}  zero-shot {row['zero_shot']:.3f} (percentile {row['zero_shot_percentile']:.0f}){extra}")
    return 0
