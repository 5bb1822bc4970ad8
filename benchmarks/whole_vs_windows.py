"""``python -m benchmarks.whole_vs_windows``: whole-volume against sliding-window sampling on the demo band.

One trained demo run (T1 -> T2, ``configs/demo.yaml``; trained here for ``--train-cpu-seconds`` when ``--run``
holds no checkpoint) samples its held-out band with the run's own sampler and call count (DDIM, 10 calls),
once whole-volume (``sample.roi_size: null``, one network call per step) and once per ``--windows`` size with
MONAI's Gaussian-blended sliding window (``sample.roi_size``, ``sample.overlap``), every setting with the
same seeds. Each sample is scored as ``idm3d evaluate`` scores it (after ``sample.mask_output``, inside the
brain mask: SSIM, PSNR) and timed in process CPU seconds (``--threads`` threads) and wall seconds. A forward
hook counts the network calls per sample and the voxels they process per chain step (in bands: 1.0
whole-volume, more where windows overlap); the high-water mark of the RSS (``VmHWM`` after a reset) above
the RSS before the sample is its peak memory growth. Every setting first runs one untimed sample (one-off
kernel and window-map costs).

    python -m benchmarks.whole_vs_windows --run runs/whole-vs-windows --out docs/bench/whole-vs-windows

writes ``<out>.jsonl`` (one row per setting and seed) and ``<out>.md`` (the table, the command, the run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.objectives import DDPM_DEMO
from idm3d.allocator import tune_malloc
from idm3d.bench.harness import machine_info, reset_peak_rss
from idm3d.children import status_kib
from idm3d.errors import ConfigError

__all__ = ["main", "parse_windows", "sample_setting", "summarise"]

WHOLE = "whole volume"


def parse_windows(text: str) -> list[tuple[int, int, int]]:
    """``"32x32x16,64x64x16"`` -> ``[(32, 32, 16), (64, 64, 16)]`` (window edges X x Y x Z)."""
    out = []
    for item in (s for s in text.split(",") if s.strip()):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"--windows: expected edges like 64x64x16, got {item!r}")
        out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def _ensure_run(run_dir: Path, cpu_seconds: float) -> None:
    """Train the demo's T1 -> T2 IDMUNet into ``run_dir`` unless it already holds a checkpoint."""
    if (run_dir / "checkpoints").is_dir():
        return
    from idm3d.demo.parallel import train_all
    from idm3d.demo.pipeline import demo_config, direction_config

    # the committed study's objective: the demo's DDPM predecessor
    cfg = direction_config(demo_config(None, [*DDPM_DEMO, "train.progress=false"], minutes=cpu_seconds / 60.0),
                           "t1-t2")
    print(f"training {run_dir} for {cpu_seconds:.0f} CPU-s", file=sys.stderr, flush=True)
    train_all([(cfg, run_dir)], torch.device("cpu"), jobs=1)


def sample_setting(run_dir: Path, roi: tuple[int, int, int] | None, seeds: list[int]) -> list[dict[str, Any]]:
    """Sample and score every held-out case once per seed with one window setting (``None``: whole volume)."""
    from idm3d.metrics import evaluate_pair
    from idm3d.runs.data_source import data_source
    from idm3d.runs.load import load_run

    run = load_run(run_dir, device="cpu", roi_size=None if roi is None else list(roi))
    counted = {"calls": 0, "voxels": 0}

    def count(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        counted["calls"] += 1
        counted["voxels"] += args[0][0, 0].numel() * args[0].shape[0]  # spatial voxels of every window

    hook = run.model.register_forward_pre_hook(count)
    rows = []
    try:
        cases = list(data_source(run.config).heldout(run.run.read_split(), "test"))
        # one untimed sample first: a setting's first chain pays one-off costs (kernel caches, window maps)
        run.infer(condition=cases[0].channels(run.sources)[None], seed=seeds[0], position=cases[0].position)
        for seed in seeds:
            for case in cases:
                counted.update(calls=0, voxels=0)
                target = case.channels(run.targets)
                rss = (status_kib("VmRSS") or 0) / 1024
                reset_peak_rss()
                cpu, wall = time.process_time(), time.monotonic()
                pred = run.infer(condition=case.channels(run.sources)[None], seed=seed, position=case.position)[0]
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                peak = (status_kib("VmHWM") or 0) / 1024 - rss
                pred = run.masked(pred, case.mask)
                mask = case.mask[0] if bool(case.mask.any()) else None
                metrics = evaluate_pair(pred[0], target[0], mask=mask)
                rows.append({
                    "setting": WHOLE if roi is None else "x".join(map(str, roi)),
                    "roi_size": None if roi is None else list(roi),
                    "overlap": None if roi is None else run.settings.overlap,
                    "case": case.case_id, "grid": list(target.shape[1:]), "seed": seed,
                    "sampler": run.settings.sampler, "steps": run.settings.steps,
                    "network_calls": counted["calls"],
                    # voxels the network processes per chain step, in bands: 1 whole-volume, more with overlap
                    "voxels_per_band": counted["voxels"] / target[0].numel() / run.settings.steps,
                    "ssim": metrics["ssim_mask"], "psnr": metrics["psnr_mask"], "mae": metrics["mae_mask"],
                    "ssim_all": metrics["ssim"], "psnr_all": metrics["psnr"],
                    "cpu_s": cpu, "wall_s": wall, "peak_growth_mib": peak,
                })
    finally:
        hook.remove()
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per setting (in the order met): means over seeds and cases, SSIM's spread, ratios to whole."""
    out: list[dict[str, Any]] = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == setting]
        mean = {k: statistics.fmean(r[k] for r in group) for k in
                ("ssim", "psnr", "ssim_all", "cpu_s", "wall_s", "network_calls", "voxels_per_band", "peak_growth_mib")}
        out.append({"setting": setting, "samples": len(group), **mean,
                    "ssim_min": min(r["ssim"] for r in group), "ssim_max": max(r["ssim"] for r in group)})
    whole = next((s for s in out if s["setting"] == WHOLE), None)
    for s in out:
        s["cpu_vs_whole"] = s["cpu_s"] / whole["cpu_s"] if whole else None
        s["ssim_vs_whole"] = s["ssim"] - whole["ssim"] if whole else None
        s["psnr_vs_whole"] = s["psnr"] - whole["psnr"] if whole else None
    return out


def _markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]], run: dict[str, Any], command: str) -> str:
    head = ("| window (X x Y x Z) | samples | network calls / sample | voxels through the net per step / band | "
            "SSIM brain, mean (min-max) | ΔSSIM vs whole | PSNR brain (dB) | ΔPSNR vs whole | CPU s / sample | "
            "CPU vs whole | wall s / sample | peak growth (MiB) |")
    lines = [head, "|---|" + "--:|" * 11]
    for s in summary:
        lines.append(
            f"| {s['setting']} | {s['samples']} | {s['network_calls']:.0f} | {s['voxels_per_band']:.2f} | "
            f"{s['ssim']:.4f} ({s['ssim_min']:.4f}-{s['ssim_max']:.4f}) | {s['ssim_vs_whole']:+.4f} | "
            f"{s['psnr']:.2f} | {s['psnr_vs_whole']:+.2f} | {s['cpu_s']:.1f} | {s['cpu_vs_whole']:.2f} | "
            f"{s['wall_s']:.1f} | {s['peak_growth_mib']:.0f} |"
        )
    first = rows[0]
    return "\n".join([
        "## Whole-volume against sliding-window sampling, demo held-out band",
        "",
        f"Command: `{command}`",
        "",
        f"Run: `{run['path']}`, the demo's T1 -> T2 IDMUNet (`configs/demo.yaml`), {run['steps']} training steps in "
        f"{run['cpu_s']:.0f} CPU-s (`train.max_cpu_seconds`; what `{run['train_command']}` trains, and what this "
        f"study trains when the run folder is new). Held-out band {first['case']}, grid "
        f"{' x '.join(map(str, first['grid']))}; sampler {first['sampler']}, {first['steps']} steps, seeds "
        f"{sorted({r['seed'] for r in rows})} (the same for every setting); windows blended by MONAI's "
        f"`SlidingWindowInferer` (Gaussian, overlap {next((r['overlap'] for r in rows if r['overlap']), 'n/a')}). "
        "SSIM/PSNR as `idm3d evaluate` scores them (after `sample.mask_output`, inside the brain mask). "
        f"Times: process CPU seconds with {run['threads']} torch thread(s), and wall seconds at load "
        f"{run['load']}, on {run['machine']}.",
        "",
        *lines,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.whole_vs_windows", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/whole-vs-windows"), help="a trained demo run (reused)")
    p.add_argument("--train-cpu-seconds", type=float, default=240.0,
                   help="train.max_cpu_seconds when --run holds no checkpoint (default 240; the demo's is 420)")
    p.add_argument("--windows", default="32x32x16,48x48x16,64x64x16",
                   help="sliding-window sizes X x Y x Z, comma list (default 32x32x16,48x48x16,64x64x16; "
                        "64x64x16 is the demo's training patch)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, the demo's per process)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/whole-vs-windows"), help="<out>.jsonl and <out>.md")
    args = p.parse_args(argv)
    windows = parse_windows(args.windows)
    if args.seeds < 1 or args.threads < 1:
        raise ConfigError(f"--seeds/--threads: expected integers >= 1, got {args.seeds}/{args.threads}")
    torch.set_num_threads(args.threads)
    tune_malloc()  # freed maps leave the RSS, so each sample's high-water mark is its own
    _ensure_run(args.run, args.train_cpu_seconds)
    from idm3d.runs.rundir import RunDir

    state = RunDir(args.run).load_checkpoint()[1]
    budget = RunDir(args.run).read_config().train.max_cpu_seconds
    budget_text = "null" if budget is None else f"{budget:g}"
    load_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    for roi in [None, *windows]:
        setting = sample_setting(args.run, roi, list(range(args.seeds)))
        rows += setting
        print(f"{setting[0]['setting']}: SSIM {statistics.fmean(r['ssim'] for r in setting):.4f}, "
              f"{statistics.fmean(r['cpu_s'] for r in setting):.1f} CPU-s/sample", file=sys.stderr, flush=True)
    info = machine_info("cpu")
    run = {"path": args.run.as_posix(), "steps": state.step, "cpu_s": float(state.cpu_s), "threads": args.threads,
           "train_command": "OMP_NUM_THREADS=1 idm3d train --config src/idm3d/configs/demo.yaml "
                            + "".join(f"--set {o} " for o in DDPM_DEMO)
                            + f"--set train.max_cpu_seconds={budget_text} --out {args.run.as_posix()}",
           "load": f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (1-minute average)",
           "machine": f"{info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch']}"}
    command = "python -m benchmarks.whole_vs_windows " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.jsonl").write_text("".join(json.dumps({**r, "run": run}) + "\n" for r in rows))
    Path(f"{args.out}.md").write_text(_markdown(summarise(rows), rows, run, command.strip()) + "\n")
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
