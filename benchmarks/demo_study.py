"""``python -m benchmarks.demo_study``: what the demo's IDMUNet costs and gains, at equal budgets, on T1 -> T2.

Variants of the demo config (``configs/demo.yaml``), each trained in its own process for the same CPU
time (``train.max_cpu_seconds``), then sampled and scored on the held-out band like ``idm3d evaluate``:

* ``idm``: the demo's IDMUNet;
* ``idm-no-bookends``: without the stem/head convolutions (``bookends=False``), the seed's ablation;
* ``idm-attention``: channel attention on the lowest level (the demo has none);
* ``monai-equal-time``: MONAI's DiffusionModelUNet for the CPU time the ``idm`` run used;
* ``monai-equal-steps``: the same MONAI net for as many steps as the ``idm`` run made (however long that
  takes), which tells whether the invertible core costs quality per step;
* ``idm-long``: the IDMUNet for ``long_minutes`` CPU minutes, scored at every checkpoint (a curve of
  held-out SSIM against training CPU time).

Output: ``<out>/<variant>/`` run folders and ``<out>/study.md`` / ``study.json``. Run again with the
same ``--out``, an interrupted study continues: finished variants are kept, interrupted ones resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.objectives import DDPM_DEMO
from idm3d.demo.parallel import train_all
from idm3d.demo.pipeline import demo_config
from idm3d.errors import ConfigError
from idm3d.inference.evaluation import baseline_config, evaluate_run
from idm3d.jsonio import dumps
from idm3d.runs.atomic import atomic_write_text
from idm3d.runs.config import Config
from idm3d.runs.load import resolve_device
from idm3d.runs.rundir import RunDir

__all__ = ["LONG_SSIM_GOAL", "VARIANTS", "run_study", "study_markdown"]

LONG_SSIM_GOAL = 0.93  # the long run's goal: held-out brain SSIM
VARIANTS = {
    "idm": "IDMUNet, the demo's settings",
    "idm-no-bookends": "IDMUNet without the stem/head convolutions (bookends=False)",
    "idm-attention": "IDMUNet with channel attention on the lowest level",
    "monai-equal-time": "MONAI DiffusionModelUNet, the CPU time the idm run used",
    "monai-equal-steps": "MONAI DiffusionModelUNet, the steps the idm run made",
    "idm-long": "IDMUNet, the long budget, scored at every checkpoint",
}
_KEYS = ("psnr_mask", "ssim_mask", "psnr", "ssim")


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"python -m benchmarks.demo_study: {message}", file=sys.stderr, flush=True)


def _model(cfg: Config, **kwargs: Any) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs={**cfg.model.kwargs, **kwargs}))


def _budget(cfg: Config, cpu_seconds: float | None, steps: int | None, **train: Any) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_cpu_seconds=cpu_seconds, max_seconds=None, max_steps=steps, progress=False, **train))


def _variant_configs(cfg: Config, minutes: float, long_minutes: float, steps: int | None) -> dict[str, Config]:
    """The IDMUNet variants (the MONAI ones depend on what the ``idm`` run used)."""
    levels = int(cfg.model.kwargs.get("levels", 3))
    budget = _budget(cfg, minutes * 60.0, steps)
    # the long run keeps every checkpoint, for the curve
    long = _budget(cfg, long_minutes * 60.0, None if steps is None else 2 * steps,
                   checkpoint_every=max(1, cfg.train.checkpoint_every), keep_checkpoints=1000)
    return {
        "idm": budget,
        "idm-no-bookends": _model(budget, bookends=False),
        "idm-attention": _model(budget, attention="channel", attention_levels=[False] * (levels - 1) + [True]),
        "idm-long": long,
    }


def _todo(runs: list[tuple[str, Config]], out: Path) -> list[tuple[Config, Path, bool]]:
    """The variants still to train, each with whether to resume it: an interrupted study continues
    where it stopped (a run whose budget is spent is done; one with a checkpoint resumes)."""
    todo = []
    for name, cfg in runs:
        run = RunDir(out / name)
        if run.latest_checkpoint() is None:
            todo.append((cfg, out / name, False))
            continue
        state, tc = run.read_state(), cfg.train
        spent = ((tc.max_steps is not None and state.step >= tc.max_steps)
                 or (tc.max_cpu_seconds is not None and state.cpu_s >= tc.max_cpu_seconds))
        if not spent:
            todo.append((cfg, out / name, True))
    return todo


def _scores(run_dir: Path, device: str, checkpoint: Path | None = None) -> dict[str, Any]:
    report = evaluate_run(run_dir, "test", device=device, progress=False, checkpoint=checkpoint)
    target = next(iter(report["summary"]))
    state = RunDir(run_dir).read_state() if checkpoint is None else None
    row = {k: float(report["summary"][target][k]["mean"]) for k in _KEYS}
    if state is not None:
        row.update(steps=state.step, cpu_s=state.cpu_s, elapsed_s=state.elapsed_s,
                   parameters=(state.signature or {}).get("num_parameters"))
    return row


def _curve(run_dir: Path, device: str) -> list[dict[str, Any]]:
    """Held-out scores at every checkpoint of a run, with the step and CPU time it was written at."""
    run, points = RunDir(run_dir), []
    for path in run.list_checkpoints():
        state = run.read_state(path)
        points.append({"step": state.step, "cpu_s": state.cpu_s, **_scores(run_dir, device, path)})
    return points


def run_study(
    out: str | Path,
    *,
    minutes: float | None = None,
    long_minutes: float = 30.0,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    jobs: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, score and report every variant into ``out``; return the report (also ``study.json``).

    Args:
        out: output folder (created; must not hold a study).
        minutes: CPU minutes of each variant (default: the demo's ``train.max_cpu_seconds``).
        long_minutes: CPU minutes of ``idm-long``.
        steps: step cap of each variant (tests, quick looks); ``idm-long`` gets twice this.
        overrides: ``key.sub=value`` changes to the demo config, for every variant.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        jobs: training processes at once (default: one per core).

    Raises:
        ConfigError: bad options or a finished study in ``out``.
    """
    out = Path(out)
    if (out / "study.json").exists():
        raise ConfigError(f"--out {out}: already holds a finished study (study.json); choose another folder")
    cfg = demo_config(None, [*DDPM_DEMO, *overrides], device=device, steps=steps)  # the committed study's objective
    if minutes is None:
        minutes = (cfg.train.max_cpu_seconds or 420.0) / 60.0
    if not minutes > 0 or not long_minutes > 0:
        raise ConfigError(f"--minutes / --long-minutes: expected positive numbers, got {minutes}, {long_minutes}")
    dev = resolve_device(cfg.train.device)
    started = time.monotonic()
    idm_cfgs = _variant_configs(cfg, minutes, long_minutes, steps)
    _say(f"training {', '.join(idm_cfgs)}", progress)
    # the long run first, so that the short ones share the other processes meanwhile
    order = sorted(idm_cfgs, key=lambda name: name != "idm-long")
    train_all(_todo([(name, idm_cfgs[name]) for name in order], out), dev, jobs)
    idm_state = RunDir(out / "idm").read_state()
    equal_time = baseline_config(idm_cfgs["idm"], idm_state.elapsed_s, max_steps=steps, cpu_seconds=idm_state.cpu_s)
    equal_steps = _budget(baseline_config(idm_cfgs["idm"], 0.0), None, idm_state.step)
    _say(f"training MONAI for {idm_state.cpu_s:.0f} CPU s and for {idm_state.step} steps", progress)
    train_all(_todo([("monai-equal-time", equal_time), ("monai-equal-steps", equal_steps)], out), dev, jobs)
    _say("sampling and scoring every variant", progress)
    rows = {name: {"description": VARIANTS[name], **_scores(out / name, str(dev))} for name in VARIANTS}
    curve = _curve(out / "idm-long", str(dev))
    long = rows["idm-long"]
    report = {
        "title": "python -m benchmarks.demo_study: T1 -> T2 on the MNI template, equal budgets",
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget": {"cpu_minutes": minutes, "long_cpu_minutes": long_minutes, "step_cap": steps},
        "variants": rows,
        "long_curve": curve,
        "goals": {"long_ssim_mask_at_least_0.93": {"value": long["ssim_mask"], "goal": LONG_SSIM_GOAL,
                                                   "met": bool(long["ssim_mask"] >= LONG_SSIM_GOAL)}},
        "wall_s": time.monotonic() - started,
    }
    atomic_write_text(out / "study.json", dumps(report, indent=2))
    atomic_write_text(out / "study.md", study_markdown(report))
    _say(f"wrote {out / 'study.md'}", progress)
    return report


def _fmt(value: Any, digits: int) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def study_markdown(r: Mapping[str, Any]) -> str:
    """The study's report."""
    b, goal = r["budget"], r["goals"]["long_ssim_mask_at_least_0.93"]
    cap = "" if b["step_cap"] is None else f", step cap {b['step_cap']}"
    lines = [f"# {r['title']}", "", f"Written {r['created']}; each variant {b['cpu_minutes']:g} CPU minutes "
             f"(idm-long {b['long_cpu_minutes']:g}){cap}; {r['wall_s'] / 60:.1f} minutes of wall time in this "
             "invocation (a resumed study counts only what it ran).", "",
             "| variant | what | parameters | steps | CPU s | PSNR brain (dB) | SSIM brain | PSNR band (dB) "
             "| SSIM band |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name, row in r["variants"].items():
        params = "n/a" if row.get("parameters") is None else f"{row['parameters']:,}"
        lines.append(f"| {name} | {row['description']} | {params} | {row['steps']} | {_fmt(row['cpu_s'], 0)} | "
                     f"{_fmt(row['psnr_mask'], 2)} | {_fmt(row['ssim_mask'], 4)} | {_fmt(row['psnr'], 2)} | "
                     f"{_fmt(row['ssim'], 4)} |")
    lines += ["", f"Long run: SSIM {_fmt(goal['value'], 4)} inside the brain mask, goal >= {goal['goal']:.2f}: "
              f"**{'met' if goal['met'] else 'not met'}**.", "", "## idm-long: held-out scores along training", "",
              "| step | CPU s | PSNR brain (dB) | SSIM brain |", "|--:|--:|--:|--:|"]
    lines += [f"| {p['step']} | {_fmt(p['cpu_s'], 0)} | {_fmt(p['psnr_mask'], 2)} | {_fmt(p['ssim_mask'], 4)} |"
              for p in r["long_curve"]]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo-study"), help="output folder (default runs/demo-study)")
    p.add_argument("--minutes", type=float, help="CPU minutes of each variant (default: the demo's budget)")
    p.add_argument("--long-minutes", type=float, default=30.0, help="CPU minutes of the long IDMUNet run")
    p.add_argument("--steps", type=int, help="cap on training steps of each net (quick looks, tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one demo config option (repeatable)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default: the config's train.device)")
    p.add_argument("--jobs", type=int, help="training processes at once (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="hide stage messages")


def run(args: argparse.Namespace) -> int:
    report = run_study(args.out, minutes=args.minutes, long_minutes=args.long_minutes, steps=args.steps,
                       overrides=args.overrides, device=args.device, jobs=args.jobs, progress=not args.no_progress)
    print(f"report: {args.out / 'study.md'}")
    for name, row in report["variants"].items():
        print(f"{name:<18} steps {row['steps']:>6}  CPU s {row['cpu_s']:>7.0f}  PSNR brain {row['psnr_mask']:6.2f}  "
              f"SSIM brain {row['ssim_mask']:.4f}")
    return 0


if __name__ == "__main__":
    from benchmarks import main

    sys.exit(main(sys.modules[__name__]))
