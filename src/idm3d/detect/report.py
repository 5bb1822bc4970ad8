"""What ``idm3d detect`` writes: ``report.json``, ``report.md``, ``roc.png``, ``features.csv``, ``detector.json``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from idm3d import jsonio
from idm3d.detect.stats import roc_points
from idm3d.runs.logs import save_figure

__all__ = ["markdown", "roc_figure", "write_report"]

LABELS = {"zero_shot": "zero-shot (Mahalanobis to reals)", "logistic": "logistic regression",
          "gradient_boosting": "gradient boosting"}


def _ci(entry: dict[str, Any]) -> str:
    return f"{entry['auroc']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def roc_figure(labels: np.ndarray, scores: dict[str, list[float]], path: Path, title: str) -> Path:
    """One ROC curve per detector (out-of-fold scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for key, values in scores.items():
        fpr, tpr = roc_points(labels, np.asarray(values))
        ax.plot(fpr, tpr, label=LABELS.get(key, key))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false-positive rate (reals called generated)", ylabel="true-positive rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: detector AUROCs with 95 % CIs, per-generator and transfer tables, features."""
    ev = report["evaluation"]
    lines = [f"# idm3d detect: {report['n_real']} real vs {report['n_fake']} generated volumes", "",
             f"Run `{report['run']}`, checkpoint `{report['checkpoint']}` ({report['weights']} weights); "
             f"DDIM inversion with {report['settings']['steps']} steps, one-step residual at "
             f"t={report['settings']['residual_timestep']}. Scores are out-of-fold ({report['folds']}-fold, grouped "
             f"by volume); 95 % intervals from {report['n_boot']} group bootstrap draws.", "",
             "| detector | AUROC [95 % CI] |", "|---|---|"]
    lines += [f"| {LABELS[k]} | {_ci(v)} |" for k, v in ev["detectors"].items()]
    if "per_generator" in ev:
        lines += ["", "Per generator (reals against one generator's fakes):", "",
                  "| generator | " + " | ".join(LABELS[k] for k in ev["detectors"]) + " |",
                  "|---|" + "---|" * len(ev["detectors"])]
        lines += [f"| {gen} | " + " | ".join(_ci(e[k]) for k in ev["detectors"]) + " |"
                  for gen, e in ev["per_generator"].items()]
    if "cross_generator" in ev:
        lines += ["", "Cross-generator transfer (fit on A's fakes, test on B's; held-out groups):", "",
                  "| A -> B | logistic regression | gradient boosting |", "|---|---|---|"]
        lines += [f"| {pair} | {_ci(e['logistic'])} | {_ci(e['gradient_boosting'])} |"
                  for pair, e in ev["cross_generator"].items()]
    lines += ["", "Per-feature AUROC (each feature alone; below 0.5 = generated volumes score lower):", "",
              "| feature | AUROC |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in ev["feature_auroc"].items()]
    if report.get("seconds_per_volume"):
        t = report["seconds_per_volume"]
        lines += ["", f"Feature time per volume: median {t['median']:.2f} s (max {t['max']:.2f} s)."]
    if "study" in report:
        st = report["study"]
        lines += ["", "## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
        names = {"zero_shot": "zero-shot AUROC, same generator (worst of the two)",
                 "supervised": "supervised AUROC, same generator (worst of the two)",
                 "cross_generator": "cross-generator AUROC (worst direction)",
                 "seconds_64": f"seconds to score one 64^3 volume, {st['timing_64']['threads']} threads (second run)"}
        lines += [f"| {names[k]} | {v['measured']:.3f} | {'<=' if k == 'seconds_64' else '>='} {v['goal']} | "
                  f"{'yes' if v['met'] else 'no'} |" for k, v in st["goals"].items()]
        t = st["timing_64"]
        lines += ["", f"64^3 timing: first volume {t['first']['wall_s']:.1f} s wall / {t['first']['cpu_s']:.1f} s "
                  f"CPU, second {t['second']['wall_s']:.1f} s wall / {t['second']['cpu_s']:.1f} s CPU.",
                  "", "Training budget: " + "; ".join(
                      f"{g}: {b['steps']} steps, {b['elapsed_s']:.0f} s" for g, b in st["training"].items())
                  + f". {st['windows']} held-out windows of {'x'.join(map(str, st['window']))} voxels."]
    for key in ("notes", "command"):
        if report.get(key):
            lines += ["", f"{key.capitalize()}: {report[key]}"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, run: Any, settings: Any, table: Any, result: dict[str, Any],
                 detector: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the outputs of one detection study into ``out`` (created); return the report."""
    out.mkdir(parents=True, exist_ok=True)
    s = dataclasses.asdict(settings)
    if s.get("residual_timestep") is None:
        s["residual_timestep"] = max(1, round(0.05 * run.config.diffusion.num_train_timesteps))
    seconds = np.asarray(table.seconds, dtype=np.float64)
    report = {
        "run": str(run.run_dir), "checkpoint": run.checkpoint.name, "step": run.state.step, "weights": run.weights,
        "settings": s, "n_real": int((table.labels == 0).sum()), "n_fake": int((table.labels == 1).sum()),
        "folds": result["folds"], "n_boot": result["n_boot"],
        "seconds_per_volume": {"median": float(np.median(seconds)), "max": float(seconds.max())} if seconds.size
        else None,
        **(extra or {}),
        "evaluation": {k: v for k, v in result.items() if k not in ("scores", "folds", "n_boot")},
        "volumes": [{"file": n, "label": int(table.labels[i]), "group": table.groups[i],
                     "generator": table.generators[i], **{k: v[i] for k, v in result["scores"].items()}}
                    for i, n in enumerate(table.names)],
    }
    (out / "report.json").write_text(jsonio.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    roc_figure(table.labels, result["scores"], out / "roc.png", "out-of-fold ROC")
    table.to_csv(out / "features.csv")
    if detector is not None:
        (out / "detector.json").write_text(jsonio.dumps(detector, indent=2))
    return report
