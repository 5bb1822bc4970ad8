"""``idm3d detect``: features of real and generated volumes through a trained run, the detectors, their scores.

:func:`extract` runs :func:`idm3d.diffusion.detection.detection_features` on each volume with the run's
denoiser; :func:`evaluate` cross-validates the zero-shot and supervised detectors on a
:class:`FeatureTable` (grouped by volume); :func:`fit_detector` is the command: read, extract, evaluate,
fit both detectors on everything and write ``report.md``, ``report.json``, ``roc.png``, ``features.csv``
and ``detector.json``; :func:`score_files` is ``idm3d detect score``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from idm3d.detect.detector import Supervised, ZeroShot, gradient_boosting, n_folds, out_of_fold
from idm3d.detect.inputs import DetectInput, check_run, read_inputs
from idm3d.detect.stats import auroc_with_ci, feature_aurocs
from idm3d.diffusion.detection import FEATURE_NAMES, detection_features
from idm3d.errors import ConfigError
from idm3d.runs.load import LoadedRun, build_scheduler, load_run

__all__ = [
    "DetectSettings",
    "FeatureTable",
    "detector_document",
    "evaluate",
    "extract",
    "fit_detector",
    "load_detector",
    "score_files",
]

DETECTOR_FORMAT = "idm3d-detector/1"


@dataclasses.dataclass(frozen=True)
class DetectSettings:
    """How features are computed: DDIM steps of the inversion (default the run's ``sample.steps``), the
    one-step residual's timestep (default 5 % of the chain) and its noise seed."""

    steps: int | None = None
    residual_timestep: int | None = None
    seed: int = 0

    def resolved(self, run: LoadedRun) -> DetectSettings:
        return dataclasses.replace(self, steps=self.steps or run.settings.steps)


@dataclasses.dataclass
class FeatureTable:
    """Rows of features: the volume's name, 0 real / 1 generated, its group (CV, bootstrap), its generator."""

    names: list[str]
    features: np.ndarray
    labels: np.ndarray
    groups: list[str]
    generators: list[str]
    seconds: list[float]

    @classmethod
    def concat(cls, tables: Sequence[FeatureTable]) -> FeatureTable:
        return cls([n for t in tables for n in t.names], np.concatenate([t.features for t in tables]),
                   np.concatenate([t.labels for t in tables]), [g for t in tables for g in t.groups],
                   [g for t in tables for g in t.generators], [s for t in tables for s in t.seconds])

    def to_csv(self, path: Path) -> Path:
        lines = [",".join(["file", "label", "group", "generator", "seconds", *FEATURE_NAMES])]
        for i, name in enumerate(self.names):
            row = [name, str(int(self.labels[i])), self.groups[i], self.generators[i], f"{self.seconds[i]:.3f}",
                   *(f"{v:.9g}" for v in self.features[i])]
            lines.append(",".join(row))
        path.write_text("\n".join(lines) + "\n")
        return path


def extract(
    run: LoadedRun,
    inputs: Sequence[DetectInput],
    label: int,
    *,
    settings: DetectSettings = DetectSettings(),
    generator: str = "",
    groups: Sequence[str] | None = None,
    progress: bool = False,
) -> FeatureTable:
    """The features of each input (label 0 real, 1 generated); each volume its own group unless ``groups``."""
    check_run(run)
    s = settings.resolved(run)
    rows, seconds = [], []
    for item in tqdm(inputs, desc="features", disable=not progress, leave=False):
        started = time.perf_counter()
        # DDIM inversion for DDPM runs; a flow run inverts its ODE with its own solver (euler|heun)
        sampler = "ddim" if run.config.diffusion.kind == "ddpm" else run.settings.sampler
        scheduler = build_scheduler(run.config, sampler, s.steps)
        feats = detection_features(run.pipeline, item.target, item.condition, scheduler=scheduler, mask=item.mask,
                                   residual_timestep=s.residual_timestep, seed=s.seed, device=run.device)
        rows.append([feats[n] for n in FEATURE_NAMES])
        seconds.append(time.perf_counter() - started)
    names = [i.name for i in inputs]
    return FeatureTable(names, np.asarray(rows, dtype=np.float64).reshape(len(inputs), len(FEATURE_NAMES)),
                        np.full(len(inputs), int(label)), list(groups) if groups is not None else list(names),
                        [generator or ("real" if label == 0 else "generated")] * len(inputs), seconds)


def _zero_shot_fit(x: np.ndarray, labels: np.ndarray) -> ZeroShot:
    return ZeroShot.fit(x[labels == 0])


def evaluate(
    table: FeatureTable, *, folds: int = 5, n_boot: int = 2000, seed: int = 0, transfer: bool = True
) -> dict[str, Any]:
    """Out-of-fold scores and AUROCs (bootstrap 95 % CI) of the zero-shot score, logistic regression and
    gradient boosting, per-feature AUROCs, per-generator AUROCs and, with two or more generators,
    cross-generator transfer (fit on one generator's fakes, score the other's)."""
    x, y, g = table.features, table.labels, np.asarray(table.groups)
    gens = np.asarray(table.generators)
    detectors = {"zero_shot": _zero_shot_fit, "logistic": Supervised.fit, "gradient_boosting": gradient_boosting(seed)}
    scores = {k: out_of_fold(fit, x, y, g, folds=folds, seed=seed) for k, fit in detectors.items()}
    result: dict[str, Any] = {
        "detectors": {k: auroc_with_ci(y, s, g, n_boot=n_boot, seed=seed) for k, s in scores.items()},
        "feature_auroc": feature_aurocs(y, x, FEATURE_NAMES),
        "scores": {k: s.tolist() for k, s in scores.items()},
        "folds": n_folds(y, g, folds),
        "n_boot": n_boot,
    }
    fakes = sorted(set(gens[y == 1]))
    if len(fakes) > 1:
        result["per_generator"] = {
            gen: {k: auroc_with_ci(y[rows], s[rows], g[rows], n_boot=n_boot, seed=seed) for k, s in scores.items()}
            for gen in fakes for rows in [(y == 0) | (gens == gen)]}
    if transfer and len(fakes) > 1:
        result["cross_generator"] = {}
        for a in fakes:
            for b in fakes:
                if a == b:
                    continue
                fit_rows, test_rows = (y == 0) | (gens == a), (y == 0) | (gens == b)
                entry = {}
                for k in ("logistic", "gradient_boosting"):
                    s = out_of_fold(detectors[k], x, y, g, train_rows=fit_rows, test_rows=test_rows, folds=folds,
                                    seed=seed)
                    entry[k] = auroc_with_ci(y[test_rows], s[test_rows], g[test_rows], n_boot=n_boot, seed=seed)
                result["cross_generator"][f"{a}->{b}"] = entry
    return result


def detector_document(run: LoadedRun, settings: DetectSettings, table: FeatureTable) -> dict[str, Any]:
    """``detector.json``: both detectors fitted on every row, with what they were fitted on."""
    x, y = table.features, table.labels
    return {
        "format": DETECTOR_FORMAT,
        "run": str(run.run_dir),
        "checkpoint": run.checkpoint.name,
        "step": run.state.step,
        "weights": run.weights,
        "settings": dataclasses.asdict(settings),
        "feature_names": list(FEATURE_NAMES),
        "zero_shot": ZeroShot.fit(x[y == 0]).to_dict(),
        "supervised": Supervised.fit(x, y).to_dict() if len(set(y.tolist())) == 2 else None,
    }


def fit_detector(
    run_dir: str | Path,
    real: Sequence[str | Path],
    fake: Sequence[str | Path],
    out: str | Path,
    *,
    conditions: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    settings: DetectSettings = DetectSettings(),
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    folds: int = 5,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """``idm3d detect``: features of ``real`` and ``fake`` volumes, cross-validated detectors, the report.

    Every input is read first, so a bad file fails before any network call. Returns the report (also
    written as ``report.json``).
    """
    from idm3d.detect.report import write_report

    for option, files in (("--real", real), ("--fake", fake)):
        if 0 < len(files) < 2:
            raise ConfigError(f"{option}: cross-validation needs at least 2 volumes, got {len(files)}")
    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    real_in = read_inputs(run, real, conditions, option="--real")
    fake_in = read_inputs(run, fake, conditions, option="--fake")
    s = settings.resolved(run)
    table = FeatureTable.concat([extract(run, real_in, 0, settings=s, progress=progress),
                                 extract(run, fake_in, 1, settings=s, progress=progress)])
    result = evaluate(table, folds=folds, n_boot=n_boot, seed=seed)
    return write_report(Path(out), run, s, table, result, detector_document(run, s, table))


def load_detector(path: str | Path, run: LoadedRun) -> dict[str, Any]:
    """A ``detector.json`` written by :func:`fit_detector`, checked against ``run``.

    Raises:
        ConfigError: unreadable, another format or feature set, or fitted on another checkpoint.
    """
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "detector.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--detector {path}: cannot read a detector ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != DETECTOR_FORMAT:
        raise ConfigError(f"--detector {path}: not a {DETECTOR_FORMAT} file")
    if doc.get("feature_names") != list(FEATURE_NAMES):
        raise ConfigError(f"--detector {path}: fitted on other features than this idm3d version computes")
    if doc.get("step") != run.state.step or doc.get("weights") != run.weights:
        raise ConfigError(f"--detector {path}: fitted on step {doc.get('step')} ({doc.get('weights')} weights), the "
                          f"run gives step {run.state.step} ({run.weights} weights)")
    return doc


def score_files(
    run_dir: str | Path,
    files: Sequence[str | Path],
    *,
    detector: str | Path | None = None,
    real: Sequence[str | Path] | None = None,
    conditions: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    settings: DetectSettings = DetectSettings(),
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """``idm3d detect score``: per file the zero-shot score (and its percentile among the calibration reals),
    and the supervised probability when ``detector`` holds one.

    The zero-shot score is calibrated by ``detector`` (a ``detector.json`` or its folder) or, without one,
    on the ``real`` volumes given here.

    Raises:
        ConfigError: neither or both of ``detector`` and ``real``; see :func:`read_inputs` for the files.
    """
    if (detector is None) == (not real):
        raise ConfigError("--detector/--real: give a fitted detector (idm3d detect --out DIR) or real volumes to "
                          "calibrate the zero-shot score on, one of the two")
    if real and len(real) < 2:
        raise ConfigError(f"--real: calibrating the zero-shot score needs at least 2 real volumes, got {len(real)}")
    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    doc = load_detector(detector, run) if detector is not None else None
    if doc is not None:
        settings = DetectSettings(**doc["settings"])
    inputs = read_inputs(run, files, conditions, option="FILE")
    real_in = read_inputs(run, real, conditions, option="--real") if doc is None else []
    s = settings.resolved(run)
    table = extract(run, inputs, 1, settings=s, progress=progress)
    if doc is None:
        zero = ZeroShot.fit(extract(run, real_in, 0, settings=s, progress=progress).features)
        supervised = None
    else:
        zero = ZeroShot.from_dict(doc["zero_shot"])
        supervised = Supervised.from_dict(doc["supervised"]) if doc.get("supervised") else None
    z = zero.score(table.features)
    pct = zero.percentile(z)
    prob = supervised.score(table.features) if supervised is not None else None
    return [{"file": name, "zero_shot": float(z[i]), "zero_shot_percentile": float(pct[i]),
             **({"probability_generated": float(prob[i])} if prob is not None else {})}
            for i, name in enumerate(table.names)]
