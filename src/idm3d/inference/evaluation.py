"""Held-out evaluation of a run: PSNR, 3D SSIM and MAE per target modality, in the brain mask and overall.

Translation runs synthesise each held-out case's targets from its sources (full reverse chain from noise).
Unconditional runs cannot be paired with a case, so they are scored on reconstruction: each held-out
target is noised to ``t = strength * T`` and denoised back (SDEdit), which measures how well the model
learned the distribution near real images. Metrics are computed on the preprocessed grid in [-1, 1]
(``data_range = 2``) by :mod:`idm3d.metrics`.

``baseline=True`` also trains a MONAI ``DiffusionModelUNet`` of matching width/depth with the same config
and the same wall-clock budget the run used, evaluates it identically and writes both side by side.

The model, its settings and the chain come from :func:`idm3d.runs.load.load_run`, the held-out cases
from the run's :class:`~idm3d.runs.data_source.DataSource`, the files from its
:class:`~idm3d.runs.rundir.RunDir`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idm3d.diffusion.solvers import FLOW_SOLVERS
from idm3d.errors import ConfigError
from idm3d.metrics import evaluate_pair
from idm3d.runs.checkpoint import TrainState
from idm3d.runs.config import Config
from idm3d.runs.data_source import HeldoutCase, data_source
from idm3d.runs.load import load_run
from idm3d.runs.model_factory import baseline_model
from idm3d.runs.rundir import RunDir

__all__ = ["BASELINE_DIR", "METRIC_KEYS", "baseline_config", "evaluate", "evaluate_run", "report_markdown",
           "train_baseline"]

BASELINE_DIR = "baseline"
METRIC_KEYS = ("psnr_mask", "ssim_mask", "mae_mask", "psnr", "ssim", "mae")
_LABELS = {"psnr_mask": "PSNR brain (dB)", "ssim_mask": "SSIM brain", "mae_mask": "MAE brain",
           "psnr": "PSNR all (dB)", "ssim": "SSIM all", "mae": "MAE all"}


def _summary(per_case: list[dict[str, Any]], targets: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in targets:
        out[t] = {}
        for k in METRIC_KEYS:
            values = np.array([c["metrics"][t][k] for c in per_case if k in c["metrics"][t]], dtype=np.float64)
            if values.size:
                out[t][k] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}
    return out


def train_stats(run: RunDir, state: TrainState) -> dict[str, Any]:
    """What the reports say of a run's training: steps, time, peak memory, parameters, final loss."""
    mem = [r["mem_mb"] for r in run.read_metrics() if isinstance(r.get("mem_mb"), (int, float))]
    sig = state.signature or {}
    return {"steps": state.step, "elapsed_s": state.elapsed_s, "peak_mem_mb": max(mem, default=None),
            "parameters": sig.get("num_parameters"), "model": sig.get("name"), "final_loss": state.last_loss}


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    *,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int | None = None,
    max_cases: int | None = None,
    use_ema: bool | None = None,
    average: int | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    on_case: Callable[[HeldoutCase, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Score one run on its held-out cases; write ``eval-<split>.json`` and ``.md`` in the run; return the report.

    ``checkpoint`` scores that checkpoint instead of the newest (e.g. the points of a time-to-quality curve).
    ``on_case(case, prediction)``, if given, receives each held-out case and its (targets, X, Y, Z) prediction
    (CPU, preprocessed intensities), e.g. to save or plot it.
    """
    run = load_run(run_dir, checkpoint=checkpoint, use_ema=use_ema, device=device, sampler=sampler, steps=steps,
                   eta=eta, seed=seed, max_cases=max_cases, average=average)
    sc, targets, sources = run.settings, run.targets, run.sources
    per_case: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, case in enumerate(data_source(run.config).heldout(run.run.read_split(), split)):
        if sc.max_cases is not None and i >= sc.max_cases:
            break
        target = case.channels(targets)
        if sources:
            pred = run.infer(condition=case.channels(sources)[None], seed=sc.seed + i, progress=progress,
                             position=case.position)[0]
        else:
            pred = run.infer(target=target[None], seed=sc.seed + i, progress=progress, position=case.position)[0]
        mask = case.mask[0] if bool(case.mask.any()) else None
        entry: dict[str, Any] = {"case": case.case_id}
        masked = run.masked(pred, case.mask)  # the case's mask comes from its sources (data.preprocess mask_from)
        if masked is not pred:
            # the raw network output is scored too, so the effect of the masking stays visible
            entry["metrics_unmasked"] = {t: evaluate_pair(pred[j], target[j], mask=mask) for j, t in enumerate(targets)}
            pred = masked
        entry["metrics"] = {t: evaluate_pair(pred[j], target[j], mask=mask) for j, t in enumerate(targets)}
        per_case.append(entry)
        if on_case is not None:
            on_case(case, pred)
    if not per_case:
        raise ConfigError(f"--split {split}: no held-out case to evaluate")
    report = {
        "run": str(run.run_dir),
        "split": split,
        "task": run.config.data.task,
        "mode": "translation from noise" if sources else f"SDEdit reconstruction from t={run.start_timestep}",
        "sources": sources,
        "targets": targets,
        "sampler": sc.sampler,
        "steps": sc.steps,
        "eta": sc.eta,
        "seed": sc.seed,
        "average": sc.average,
        "mask_output": bool(sc.mask_output and sources),
        "weights": run.weights,
        "checkpoint": str(run.checkpoint),
        "intensity_space": "preprocessed [-1, 1], data_range 2",
        "seconds_per_case": (time.monotonic() - started) / len(per_case),
        "train": train_stats(run.run, run.state),
        "summary": _summary(per_case, targets),
        "cases": per_case,
    }
    run.run.write_json(f"eval-{split}.json", report)
    run.run.write_text(f"eval-{split}.md", report_markdown([("model", report)]))
    return report


def _fmt(entry: dict[str, float] | None, digits: int) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def sampler_text(settings: Mapping[str, Any]) -> str:
    """``sampler``, ``steps`` and ``eta`` in words; the flow's ODE solvers have no eta."""
    eta = "" if settings["sampler"] in FLOW_SOLVERS else f", eta {settings['eta']}"
    return f"{settings['sampler']} sampler, {settings['steps']} network calls{eta}"


def report_markdown(reports: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table, one row per (model, target modality), mean ± std over the held-out cases."""
    first = reports[0][1]
    lines = [
        f"# Evaluation on the '{first['split']}' split ({len(first['cases'])} case(s))",
        "",
        f"Task: {first['task']} ({first['mode']}); sources {first['sources'] or '-'} -> targets {first['targets']}; "
        f"{sampler_text(first)}, seed {first['seed']}, "
        f"{first['weights']} weights. Metrics on the {first['intensity_space']}; 'brain' = inside the brain mask.",
        "",
        "| model | target | " + " | ".join(_LABELS[k] for k in METRIC_KEYS) + " | train steps | train s | "
        "peak train MiB | parameters |",
        "|" + "---|" * (len(METRIC_KEYS) + 6),
    ]
    for name, rep in reports:
        tr = rep["train"]
        for t in rep["targets"]:
            cells = [_fmt(rep["summary"][t].get(k), 4 if k.startswith(("ssim", "mae")) else 2) for k in METRIC_KEYS]
            mem = "n/a" if tr.get("peak_mem_mb") is None else f"{tr['peak_mem_mb']:.0f}"
            secs = "n/a" if tr.get("elapsed_s") is None else f"{tr['elapsed_s']:.0f}"
            lines.append(f"| {name} ({tr.get('model')}) | {t} | " + " | ".join(cells)
                         + f" | {tr.get('steps')} | {secs} | {mem} | {tr.get('parameters')} |")
    lines += ["", "'all' = the whole preprocessed grid (brain box plus margin, padded with background). Peak train "
              "MiB: the largest logged process RSS on CPU (it includes everything else in the process), peak CUDA "
              "allocation on GPU."]
    return "\n".join(lines) + "\n"


def baseline_config(
    cfg: Config, seconds: float, max_steps: int | None = None, *, cpu_seconds: float | None = None
) -> Config:
    """The same-budget MONAI baseline of an IDMUNet run: :func:`~idm3d.runs.model_factory.baseline_model`,
    the same data, diffusion and optimiser, the run's training time and at most ``max_steps`` steps.

    The budget is of the run's kind: ``cpu_seconds`` of CPU time when the run had a CPU-time budget
    (``train.max_cpu_seconds``) and ``cpu_seconds`` is given, else ``seconds`` of wall time.
    """
    train = dataclasses.replace(cfg.train, max_steps=max_steps)
    if cfg.train.max_cpu_seconds is not None and cpu_seconds is not None:
        train = dataclasses.replace(train, max_seconds=None, max_cpu_seconds=max(float(cpu_seconds), 1e-3))
    else:
        train = dataclasses.replace(train, max_seconds=max(float(seconds), 1e-3), max_cpu_seconds=None)
    return dataclasses.replace(cfg, model=baseline_model(cfg.model), train=train)


def train_baseline(run_dir: str | Path, progress: bool = True) -> Path:
    """Train (or reuse) ``<run>/baseline``: a MONAI DiffusionModelUNet with the run's config and time budget."""
    from idm3d.training.trainer import train

    run = RunDir(run_dir)
    base = RunDir(run.path / BASELINE_DIR)
    if base.latest_checkpoint() is not None:
        return base.path
    cfg = run.read_config()
    if cfg.model.name != "idm":
        raise ConfigError(f"--baseline: run {run.path} is already a '{cfg.model.name}' model; nothing to compare")
    if run.latest_checkpoint() is None:
        raise ConfigError(f"--baseline: run {run.path} has no checkpoint")
    state = run.read_state()
    base_cfg = baseline_config(cfg, state.elapsed_s, cpu_seconds=state.cpu_s)
    base_cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, progress=progress))
    split = run.read_split()
    if split is not None:  # same held-out cases
        base.write_split(split)
    return train(base_cfg, base.path)


def evaluate(
    run_dir: str | Path, split: str = "test", *, baseline: bool = False, progress: bool = True, **kwargs: Any
) -> dict[str, Any]:
    """Evaluate a run (and, with ``baseline``, a same-budget MONAI baseline); return the report(s).

    With a baseline the run folder also gets ``eval-<split>-vs-baseline.md`` and the returned dict holds
    ``{"model": report, "baseline": report}``.
    """
    report = evaluate_run(run_dir, split, progress=progress, **kwargs)
    if not baseline:
        return report
    base_dir = train_baseline(run_dir, progress=progress)
    base = evaluate_run(base_dir, split, progress=progress, **kwargs)
    run = RunDir(run_dir)
    run.write_text(f"eval-{split}-vs-baseline.md", report_markdown([("IDM", report), ("baseline", base)]))
    both = {"model": report, "baseline": base}
    run.write_json(f"eval-{split}-vs-baseline.json", both)
    return both
