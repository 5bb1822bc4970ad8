"""Held-out evaluation of a run: PSNR, 3D SSIM and MAE per target modality, in the brain mask and overall.

Translation runs synthesise each held-out case's targets from its sources (full reverse chain from noise).
Unconditional runs cannot be paired with a case, so they are scored on reconstruction: each held-out
target is noised to ``t = strength * T`` and denoised back (SDEdit), which measures how well the model
learned the distribution near real images. Metrics are computed on the preprocessed grid in [-1, 1]
(``data_range = 2``) by :mod:`idm3d.metrics`.

``baseline=True`` also trains a MONAI ``DiffusionModelUNet`` of matching width/depth with the same config
and the same wall-clock budget the run used, evaluates it identically and writes both side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idm3d.diffusion.sampling import denoise_fn
from idm3d.diffusion.sampling import sample as run_chain
from idm3d.diffusion.schedule import build_scheduler
from idm3d.errors import ConfigError
from idm3d.metrics import evaluate_pair
from idm3d.training import run as runlib
from idm3d.training.checkpoint import atomic_write_text, latest_checkpoint
from idm3d.training.config import ModelConfig
from idm3d.training.data_source import HeldoutCase, heldout_cases
from idm3d.training.generate import mask_background, sample_settings
from idm3d.training.logs import read_metrics
from idm3d.training.model_factory import baseline_kwargs
from idm3d.training.run import load_run, resolve_device

__all__ = ["BASELINE_DIR", "METRIC_KEYS", "evaluate", "evaluate_run", "report_markdown", "train_baseline"]

BASELINE_DIR = "baseline"
METRIC_KEYS = ("psnr_mask", "ssim_mask", "mae_mask", "psnr", "ssim", "mae")
_LABELS = {"psnr_mask": "PSNR brain (dB)", "ssim_mask": "SSIM brain", "mae_mask": "MAE brain",
           "psnr": "PSNR all (dB)", "ssim": "SSIM all", "mae": "MAE all"}


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf" for identical volumes; JSON has no infinity
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _summary(per_case: list[dict[str, Any]], targets: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in targets:
        out[t] = {}
        for k in METRIC_KEYS:
            values = np.array([c["metrics"][t][k] for c in per_case if k in c["metrics"][t]], dtype=np.float64)
            if values.size:
                out[t][k] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}
    return out


def _train_stats(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    mem = [r["mem_mb"] for r in read_metrics(run_dir / runlib.METRICS) if isinstance(r.get("mem_mb"), (int, float))]
    sig = state.get("signature", {})
    return {"steps": state.get("step"), "elapsed_s": state.get("elapsed_s"), "peak_mem_mb": max(mem, default=None),
            "parameters": sig.get("num_parameters"), "model": sig.get("name"), "final_loss": state.get("last_loss")}


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
    device: str = "auto",
    progress: bool = True,
    on_case: Callable[[HeldoutCase, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Score one run on its held-out cases; write ``eval-<split>.json`` and ``.md`` in the run; return the report.

    ``on_case(case, prediction)``, if given, receives each held-out case and its (targets, X, Y, Z) prediction
    (CPU, preprocessed intensities), e.g. to save or plot it.
    """
    run_dir = Path(run_dir)
    dev = resolve_device(device, "--device")
    if use_ema is None:
        use_ema = runlib.read_run_config(run_dir).sample.use_ema
    run = load_run(run_dir, use_ema=use_ema, device=dev)
    cfg = run.config
    sc = sample_settings(cfg, sampler=sampler, steps=steps, eta=eta, seed=seed, max_cases=max_cases)
    scheduler = build_scheduler(cfg.diffusion, sc.sampler, sc.steps)
    f = denoise_fn(run.model, sc.roi_size, sc.overlap)
    targets, sources = list(cfg.data.targets), list(cfg.data.sources) if cfg.data.task == "translate" else []
    start_t = round(sc.strength * (cfg.diffusion.num_train_timesteps - 1))
    per_case: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, case in enumerate(heldout_cases(cfg, run_dir, split)):
        if sc.max_cases is not None and i >= sc.max_cases:
            break
        target = case.channels(targets)
        generator = torch.Generator().manual_seed(sc.seed + i)
        shape = (1, len(targets), *target.shape[1:])
        if sources:
            pred = run_chain(f, scheduler, shape, case.channels(sources)[None], generator=generator, eta=sc.eta,
                             device=dev, progress=progress)
        else:
            pred = run_chain(f, scheduler, shape, None, generator=generator, eta=sc.eta, device=dev,
                             x_start=target[None], start_timestep=start_t, progress=progress)
        pred = pred.cpu()[0]
        mask = case.mask[0] if bool(case.mask.any()) else None
        entry: dict[str, Any] = {"case": case.case_id}
        if sc.mask_output and sources:  # the case's mask comes from its sources (data.preprocess mask_from)
            # the raw network output is scored too, so the effect of the masking stays visible
            entry["metrics_unmasked"] = {t: evaluate_pair(pred[j], target[j], mask=mask) for j, t in enumerate(targets)}
            pred = mask_background(pred, case.mask)
        entry["metrics"] = {t: evaluate_pair(pred[j], target[j], mask=mask) for j, t in enumerate(targets)}
        per_case.append(entry)
        if on_case is not None:
            on_case(case, pred)
    if not per_case:
        raise ConfigError(f"--split {split}: no held-out case to evaluate")
    report = {
        "run": str(run_dir),
        "split": split,
        "task": cfg.data.task,
        "mode": "translation from noise" if sources else f"SDEdit reconstruction from t={start_t}",
        "sources": sources,
        "targets": targets,
        "sampler": sc.sampler,
        "steps": sc.steps,
        "eta": sc.eta,
        "seed": sc.seed,
        "mask_output": bool(sc.mask_output and sources),
        "weights": run.weights,
        "checkpoint": str(run.checkpoint),
        "intensity_space": "preprocessed [-1, 1], data_range 2",
        "seconds_per_case": (time.monotonic() - started) / len(per_case),
        "train": _train_stats(run_dir, run.state),
        "summary": _summary(per_case, targets),
        "cases": per_case,
    }
    atomic_write_text(run_dir / f"eval-{split}.json", json.dumps(_json_safe(report), indent=2) + "\n")
    atomic_write_text(run_dir / f"eval-{split}.md", report_markdown([("model", report)]))
    return report


def _fmt(entry: dict[str, float] | None, digits: int) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def report_markdown(reports: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table, one row per (model, target modality), mean ± std over the held-out cases."""
    first = reports[0][1]
    lines = [
        f"# Evaluation on the '{first['split']}' split ({len(first['cases'])} case(s))",
        "",
        f"Task: {first['task']} ({first['mode']}); sources {first['sources'] or '-'} -> targets {first['targets']}; "
        f"{first['sampler']} sampler, {first['steps']} steps, eta {first['eta']}, seed {first['seed']}, "
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


def train_baseline(run_dir: str | Path, progress: bool = True) -> Path:
    """Train (or reuse) ``<run>/baseline``: a MONAI DiffusionModelUNet with the run's config and time budget."""
    from idm3d.training.trainer import train

    run_dir = Path(run_dir)
    out = run_dir / BASELINE_DIR
    if latest_checkpoint(out / runlib.CHECKPOINTS) is not None:
        return out
    cfg = runlib.read_run_config(run_dir)
    if cfg.model.name != "idm":
        raise ConfigError(f"--baseline: run {run_dir} is already a '{cfg.model.name}' model; nothing to compare")
    state_path = latest_checkpoint(run_dir / runlib.CHECKPOINTS)
    if state_path is None:
        raise ConfigError(f"--baseline: run {run_dir} has no checkpoint")
    elapsed = float(json.loads(state_path.read_text())["elapsed_s"])
    base_cfg = dataclasses.replace(
        cfg,
        model=ModelConfig("monai", baseline_kwargs(cfg.model.kwargs)),
        train=dataclasses.replace(cfg.train, max_steps=None, max_seconds=max(elapsed, 1e-3), progress=progress),
    )
    out.mkdir(parents=True, exist_ok=True)
    if (run_dir / runlib.SPLIT).is_file():  # same held-out cases
        shutil.copyfile(run_dir / runlib.SPLIT, out / runlib.SPLIT)
    return train(base_cfg, out)


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
    table = report_markdown([("IDM", report), ("baseline", base)])
    atomic_write_text(Path(run_dir) / f"eval-{split}-vs-baseline.md", table)
    both = {"model": report, "baseline": base}
    atomic_write_text(Path(run_dir) / f"eval-{split}-vs-baseline.json", json.dumps(_json_safe(both), indent=2) + "\n")
    return both
