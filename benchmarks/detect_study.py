"""The reproducible detection study on the embedded MNI templates (docs/detect.md).

1. Train the demo's IDMUNet (``configs/demo.yaml``) for ``steps`` steps and the demo's same-budget MONAI
   baseline (:func:`idm3d.inference.evaluation.baseline_config`: the IDMUNet's training time, the same step
   cap) - or reuse the ``idm/`` and ``monai/`` runs of an earlier demo or study (``runs``).
2. Held-out material: the axial bands of 16 slices from the demo's held-out band upwards (never touched
   by training patches). Each generator translates every band's T1 once (the run's settings, masked as
   ``idm3d sample`` does); bands are cut into windows of 32 x 32 x 16 voxels (stride 16) holding at least a
   quarter brain. A window's real T2, its two generated T2s and its T1 form one group.
3. No shortcut: every window - real or generated - is written with the same writer (float32 NIfTI, the
   band's affine) and read back through the same safe reader before scoring.
4. Features through the IDMUNet run; zero-shot, logistic regression and gradient boosting cross-validated
   grouped by window, per generator, and transferred between generators; then the time to score one
   64^3 volume with ``threads`` torch threads (wall and process CPU time, first and second volume).
5. ``--generators idm flow`` (with ``--runs`` holding ``flow/``, a ``diffusion.kind: rflow`` run of the demo):
   the flow run is a generator, and a second detector whose features come through the flow's ODE inversion
   (``flow-detector/report.md``); ``--max-windows`` keeps that many windows, evenly spread, for a reduced
   budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.objectives import DDPM_DEMO, FLOW
from idm3d.data.nifti import load_volume, save_volume
from idm3d.demo.pipeline import demo_config
from idm3d.detect.core import DetectSettings, FeatureTable, detector_document, evaluate, extract
from idm3d.detect.inputs import DetectInput, as_input
from idm3d.detect.report import write_report
from idm3d.errors import ConfigError
from idm3d.inference.evaluation import baseline_config
from idm3d.runs.data_source import DemoSource
from idm3d.runs.load import LoadedRun, load_run
from idm3d.runs.rundir import RunDir
from idm3d.training.trainer import train

__all__ = ["GOALS", "STUDY_STEPS", "WINDOW", "run_study", "time_64"]

STUDY_STEPS = 300  # training steps of each net in the default study (the demo trains ~8 minutes)
WINDOW = (32, 32, 16)
STRIDE = 16
MIN_BRAIN = 0.25
GENERATORS = ("idm", "monai")
KNOWN_GENERATORS = ("idm", "monai", "flow")
GOALS = {"zero_shot": 0.95, "supervised": 0.99, "cross_generator": 0.90, "seconds_64": 30.0}


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"python -m benchmarks.detect_study: {message}", file=sys.stderr, flush=True)


def _train(out: Path, steps: int, progress: bool, generators: tuple[str, ...] = GENERATORS) -> dict[str, float]:
    def fixed(overrides: list[str]) -> Any:
        cfg = demo_config(None, [*DDPM_DEMO, *overrides], steps=steps)  # the committed study's objective
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_seconds=None, max_cpu_seconds=None,
                                                                  progress=progress))

    cfg = fixed([])
    _say(f"training the IDMUNet for {steps} steps", progress)
    started = time.process_time()
    train(cfg, out / "idm")
    cpu = {"idm": time.process_time() - started}
    if "monai" in generators:
        elapsed = RunDir(out / "idm").read_state().elapsed_s
        _say(f"training the MONAI baseline for the same {elapsed:.0f} s (at most {steps} steps)", progress)
        started = time.process_time()
        train(baseline_config(cfg, elapsed, max_steps=steps), out / "monai")
        cpu["monai"] = time.process_time() - started
    if "flow" in generators:
        _say(f"training the IDMUNet with rectified flow for {steps} steps", progress)
        started = time.process_time()
        train(fixed(FLOW), out / "flow")
        cpu["flow"] = time.process_time() - started
    return cpu


def _bands(demo: Any) -> list[range]:
    depth, start = demo.shape[-1], demo.test_slices.start
    bands = []
    while start + WINDOW[2] <= depth:
        band = range(start, start + WINDOW[2])
        if float(demo.mask[0][..., band.start:band.stop].float().mean()) > 0.05:
            bands.append(band)
        start += WINDOW[2]
    return bands


def _windows(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(x, y) for x in range(0, shape[0] - WINDOW[0] + 1, STRIDE) for y in range(0, shape[1] - WINDOW[1] + 1,
                                                                                      STRIDE)]


def _roundtrip(path: Path, volume: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    save_volume(path, volume.numpy(), affine)
    return torch.from_numpy(load_volume(path)[0].copy())[None]


def _material(out: Path, runs: dict[str, LoadedRun], progress: bool) -> tuple[dict[str, list[DetectInput]], list[str]]:
    """Real and generated windows, each written and read back the same way; their group names."""
    demo = DemoSource(runs["idm"].config).demo
    source, target = runs["idm"].sources[0], runs["idm"].targets[0]
    inputs: dict[str, list[DetectInput]] = {"real": [], **{g: [] for g in runs}}
    groups = []
    for band in _bands(demo):
        z = slice(band.start, band.stop)
        t1, t2, mask = (demo.record.channel(source)[..., z], demo.record.channel(target)[..., z], demo.mask[..., z])
        fakes = {}
        for name, run in runs.items():
            _say(f"{name}: translating band z in [{band.start}, {band.stop})", progress)
            fakes[name] = run.masked(run.infer(condition=t1[None]), mask[None])[0]
        for x, y in _windows(tuple(t1.shape[1:])):
            crop = (slice(None), slice(x, x + WINDOW[0]), slice(y, y + WINDOW[1]))
            m = mask[crop]
            if float(m.float().mean()) < MIN_BRAIN:
                continue
            shift = np.eye(4)
            shift[:3, 3] = [x, y, band.start]
            affine = demo.affine @ shift
            group = f"z{band.start}_x{x}_y{y}"
            groups.append(group)
            cond = _roundtrip(out / "volumes" / "real" / f"{group}_{source}.nii.gz", t1[crop], affine)
            for name, volume in (("real", t2), *fakes.items()):
                vol = _roundtrip(out / "volumes" / name / f"{group}_{target}.nii.gz", volume[crop], affine)
                inputs[name].append(as_input(f"{name}/{group}", vol, cond, m))
    if len(groups) < 4:
        raise ConfigError(f"study: only {len(groups)} held-out windows with brain; the demo grid is too small")
    return inputs, groups


def _subsample(inputs: dict[str, list[DetectInput]], groups: list[str], keep: int | None
               ) -> tuple[dict[str, list[DetectInput]], list[str]]:
    """``keep`` windows evenly spread over the held-out ones (all of them with ``None``)."""
    if keep is None or keep >= len(groups):
        return inputs, groups
    if keep < 4:
        raise ConfigError(f"--max-windows: expected at least 4 windows, got {keep}")
    rows = np.linspace(0, len(groups) - 1, keep).round().astype(int).tolist()
    return {k: [v[i] for i in rows] for k, v in inputs.items()}, [groups[i] for i in rows]


def time_64(run: LoadedRun, settings: DetectSettings, threads: int) -> dict[str, Any]:
    """Seconds (wall, process CPU) to score one 64^3 volume: a central crop of the template, twice."""
    demo = DemoSource(run.config).demo
    size = 64
    starts = [max(0, (s - size) // 2) for s in demo.shape]
    if min(demo.shape) < size:
        raise ConfigError(f"study: the demo grid {demo.shape} is smaller than 64^3")
    crop = tuple(slice(s, s + size) for s in starts)
    item = as_input("t2_64", demo.record.channel(run.targets[0])[(slice(None), *crop)],
                    demo.record.channel(run.sources[0])[(slice(None), *crop)], demo.mask[(slice(None), *crop)])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        records = []
        for _ in range(2):
            wall, cpu = time.perf_counter(), time.process_time()
            extract(run, [item], 0, settings=settings)
            records.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
    finally:
        torch.set_num_threads(previous)
    return {"shape": [size] * 3, "threads": threads, "first": records[0], "second": records[1]}


def _per_generator(result: dict[str, Any]) -> dict[str, Any]:
    return result.get("per_generator") or {}


def _goals(result: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    per = result["per_generator"]
    zero = min(per[g]["zero_shot"]["auroc"] for g in per)
    sup = min(max(per[g]["logistic"]["auroc"], per[g]["gradient_boosting"]["auroc"]) for g in per)
    cross = min(max(e["logistic"]["auroc"], e["gradient_boosting"]["auroc"])
                for e in result["cross_generator"].values())
    secs = timing["second"]["wall_s"]
    rows = {"zero_shot": zero, "supervised": sup, "cross_generator": cross, "seconds_64": secs}
    return {k: {"measured": v, "goal": GOALS[k], "met": (v <= GOALS[k]) if k == "seconds_64" else (v >= GOALS[k])}
            for k, v in rows.items()}


def run_study(
    out: str | Path,
    *,
    steps: int | None = None,
    runs: str | Path | None = None,
    threads: int = 2,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
    generators: tuple[str, ...] = GENERATORS,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """Run the study into ``out`` and return its report (also ``report.json``/``report.md``)."""
    unknown = [g for g in generators if g not in KNOWN_GENERATORS] + ([] if "idm" in generators else ["(no idm)"])
    if unknown or len(generators) < 2:
        raise ConfigError(f"--generators: expected idm and at least one of monai|flow, got {' '.join(generators)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    steps = STUDY_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ConfigError(f"--train-steps: expected a positive integer, got {steps}")
    run_root = Path(runs) if runs is not None else out / "runs"
    cpu = None
    if runs is None:
        cpu = _train(run_root, steps, progress, generators)
    loaded = {g: load_run(run_root / g, device="cpu") for g in generators}
    inputs, groups = _subsample(*_material(out, loaded, progress), max_windows)
    detector_run = loaded["idm"]
    settings = DetectSettings().resolved(detector_run)

    def features(run: LoadedRun, what: str) -> FeatureTable:
        _say(f"features of {len(groups)} windows x {1 + len(generators)} through {what}", progress)
        tables = [extract(run, inputs["real"], 0, settings=DetectSettings().resolved(run), generator="real",
                          groups=groups)]
        tables += [extract(run, inputs[g], 1, settings=DetectSettings().resolved(run), generator=g, groups=groups)
                   for g in generators]
        return FeatureTable.concat(tables)

    table = features(detector_run, "the IDMUNet")
    result = evaluate(table, n_boot=n_boot, seed=seed)
    flow_detector = None
    if "flow" in generators:
        flow_run = loaded["flow"]
        flow_settings = DetectSettings().resolved(flow_run)
        flow_table = features(flow_run, "the flow run (ODE inversion)")
        flow_result = evaluate(flow_table, n_boot=n_boot, seed=seed)
        write_report(out / "flow-detector", flow_run, flow_settings, flow_table, flow_result,
                     detector_document(flow_run, flow_settings, flow_table),
                     {"notes": f"the features of the same windows through the flow run ({flow_run.settings.sampler} "
                               f"inversion of the flow's ODE, {flow_settings.steps} network calls), not DDIM"})
        flow_detector = {"zero_shot": {g: e["zero_shot"] for g, e in _per_generator(flow_result).items()},
                         "all": flow_result["detectors"], "report": "flow-detector/report.md"}
    _say("timing one 64^3 volume", progress)
    timing = time_64(detector_run, settings, threads)
    goals = _goals(result, timing)
    budget = {g: {"steps": RunDir(run_root / g).read_state().step,
                  "elapsed_s": RunDir(run_root / g).read_state().elapsed_s,
                  "cpu_s": RunDir(run_root / g).read_state().cpu_s,
                  **({"process_cpu_s": cpu[g]} if cpu else {})} for g in generators}
    trained = (f"each net trained {steps} steps (a short budget; longer budgets are the real study)" if runs is None
               else "the nets of " + str(runs) + " (" + ", ".join(f"{g} {b['steps']} steps in {b['elapsed_s']:.0f} s"
                                                             for g, b in budget.items()) + ")")
    met = ", ".join(f"{k} {v['measured']:.3f} ({'met' if v['met'] else 'missed'}, goal {v['goal']})"
                    for k, v in goals.items())
    command = f"python -m benchmarks.detect_study --out {out} --train-steps {steps}" if runs is None else \
        f"python -m benchmarks.detect_study --out {out} --runs {runs}"
    if tuple(generators) != GENERATORS:
        command += " --generators " + " ".join(generators)
    if max_windows is not None:
        command += f" --max-windows {max_windows}"
    command += (f" --bootstrap {n_boot}" if n_boot != 2000 else "") + (f" --threads {threads}" if threads != 2 else "")
    names = {"idm": "the IDMUNet's (DDPM)", "monai": "the MONAI baseline's", "flow": "the rectified-flow IDMUNet's"}
    extra = {"study": {"windows": len(groups), "window": list(WINDOW), "stride": STRIDE, "min_brain": MIN_BRAIN,
                       "training": budget, "timing_64": timing, "goals": goals,
                       "total_s": time.monotonic() - started,
                       **({"flow_detector": flow_detector} if flow_detector else {})},
             "summary": f"goals: {met}", "command": command,
             "notes": f"real = held-out MNI T2 windows; generated = {' and '.join(names[g] for g in generators)} T2 "
                      f"from the same T1 windows, {trained}. Groups = windows; {met}."}
    return write_report(out, detector_run, settings, table, result, detector_document(detector_run, settings, table),
                        extra)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps of each net (default: the study's budget, docs/detect.md)")
    p.add_argument("--runs", type=Path, default=None,
                   help="reuse trained runs: a folder holding idm/ and monai/ (e.g. an `idm3d demo --out` folder)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the 64^3 timing")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws of the 95%% intervals")
    p.add_argument("--no-progress", action="store_true", help="hide the progress messages")
    p.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=KNOWN_GENERATORS,
                   help="idm plus monai and/or flow (flow: also a detector through its ODE inversion)")
    p.add_argument("--max-windows", type=int, default=None, help="keep this many held-out windows (reduced budget)")


def run(args: argparse.Namespace) -> int:
    report = run_study(args.out, steps=args.train_steps, runs=args.runs, threads=args.threads, n_boot=args.bootstrap,
                       progress=not args.no_progress, generators=tuple(args.generators),
                       max_windows=args.max_windows)
    print(report["summary"])
    print(args.out / "report.md")
    return 0


if __name__ == "__main__":
    from benchmarks import main

    sys.exit(main(sys.modules[__name__]))
