"""``python -m benchmarks.sampling_steps``: held-out quality against network calls, DDPM vs rectified flow.

The ``make run`` task (``configs/demo.yaml``, T1 -> T2 and T2 -> T1 on the MNI template), trained twice per
direction for the same CPU budget (``train.max_cpu_seconds``, so the result does not depend on the load of
the machine): once with the demo's DDPM objective, once with rectified flow (``diffusion.kind: rflow``, every
other setting the demo's). Each run is scored on the held-out band as ``idm3d evaluate`` scores it, at
1, 2, 4, 8, 16, 32 network calls (DDIM for DDPM; Euler and Heun for the flow) plus today's default (DDIM,
10 calls). One JSON line per point goes to ``docs/sampling/steps.jsonl``; ``docs/sampling/steps.png`` plots
them. Training and scoring run in child processes, one thread each (the demo's layout on 2 cores).
Run again with the same ``--out`` and the trained runs are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CALLS = (1, 2, 4, 8, 16, 32)
DEFAULT_POINT = ("ddpm", "ddim", 10)  # today's default: DDPM-trained, DDIM with 10 calls
OBJECTIVES = {
    "ddpm": [],
    # every other setting is the demo's (l1 loss, EMA, patches, mask_output); MAISI's 1000 train timesteps
    "rflow": ["diffusion.kind=rflow", "diffusion.prediction_type=flow", "diffusion.num_train_timesteps=1000",
              "sample.sampler=euler"],
}
SAMPLERS = {"ddpm": ("ddim",), "rflow": ("euler", "heun")}
S_PER_CALL_256 = 71.4  # docs/bench/inference-256.jsonl: one no-grad 256^3 IDMUNet() call, 2 CPU cores


def _configs(cpu_seconds: float, overrides: list[str]) -> dict[tuple[str, str], Any]:
    from idm3d.demo.pipeline import DIRECTIONS, demo_config, direction_config

    out = {}
    for objective, extra in OBJECTIVES.items():
        cfg = demo_config(None, [*extra, *overrides, "train.progress=false"], minutes=cpu_seconds / 60.0)
        for direction in DIRECTIONS:
            out[(objective, direction)] = direction_config(cfg, direction)
    return out


def _score(job: dict[str, Any]) -> list[dict[str, Any]]:
    """In a child: every (sampler, calls) point of one run on the held-out band."""
    import torch

    from idm3d.inference.evaluation import evaluate_run
    from idm3d.runs.rundir import RunDir

    torch.set_num_threads(1)
    state = RunDir(job["run"]).load_checkpoint()[1]
    rows = []
    for sampler, calls in job["points"]:
        cpu, wall = time.process_time(), time.monotonic()
        report = evaluate_run(job["run"], "test", sampler=sampler, steps=calls, device="cpu", progress=False)
        target = report["targets"][0]
        summary = report["summary"][target]
        n = summary["ssim_mask"]["n"]
        rows.append({
            "direction": job["direction"], "training": job["objective"], "sampler": sampler, "calls": calls,
            "ssim": summary["ssim_mask"]["mean"], "psnr": summary["psnr_mask"]["mean"],
            "ssim_all": summary["ssim"]["mean"], "psnr_all": summary["psnr"]["mean"],
            "cpu_s_train": float(state.cpu_s), "train_steps": state.step,
            "cpu_s_sample": (time.process_time() - cpu) / n, "wall_s_sample": (time.monotonic() - wall) / n,
            "threads": 1, "metric": "held-out band, inside the brain mask, mean over cases",
        })
    return rows


def run_study(
    out: Path, cpu_seconds: float, overrides: list[str], jobs: int, calls: tuple[int, ...] = CALLS
) -> list[dict[str, Any]]:
    """Train the four runs (reusing finished ones), score every point, return the JSON rows."""
    import torch

    from idm3d.demo.parallel import train_all

    configs = _configs(cpu_seconds, overrides)
    todo = [(cfg, out / f"{obj}-{d}") for (obj, d), cfg in configs.items()
            if not (out / f"{obj}-{d}" / "checkpoints").is_dir()]
    if todo:
        print(f"training {len(todo)} run(s), {cpu_seconds:.0f} CPU-s each", file=sys.stderr, flush=True)
        train_all(todo, torch.device("cpu"), jobs=jobs)
    score_jobs = []
    for (obj, d) in configs:
        points = [(s, c) for s in SAMPLERS[obj] for c in calls]
        if obj == DEFAULT_POINT[0]:
            points.append(DEFAULT_POINT[1:])
        score_jobs.append({"run": str(out / f"{obj}-{d}"), "direction": d, "objective": obj, "points": points})
    with ProcessPoolExecutor(jobs) as pool:
        rows = [r for rs in pool.map(_score, score_jobs) for r in rs]
    for row in rows:
        row["cpu_s_budget"] = cpu_seconds
        row["s_256_estimate"] = row["calls"] * S_PER_CALL_256
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """SSIM (brain) against network calls, one panel per direction, one line per objective/sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = sorted({r["direction"] for r in rows})
    fig, axes = plt.subplots(1, len(directions), figsize=(5 * len(directions), 3.6), squeeze=False)
    for ax, d in zip(axes[0], directions):
        for key in sorted({(r["training"], r["sampler"]) for r in rows}):
            pts = sorted((r["calls"], r["ssim"]) for r in rows if r["direction"] == d
                         and (r["training"], r["sampler"]) == key and r["calls"] != DEFAULT_POINT[2])
            ax.plot(*zip(*pts), marker="o", label=f"{key[0]} / {key[1]}")
        ref = [r["ssim"] for r in rows if r["direction"] == d and (r["training"], r["sampler"], r["calls"])
               == DEFAULT_POINT]
        if ref:
            ax.axhline(ref[0], color="grey", ls="--", lw=1, label="today's default (DDIM 10)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network calls")
        ax.set_ylabel("held-out SSIM (brain)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """Held-out brain SSIM (PSNR dB) per objective/sampler (rows) and network calls (columns), per direction."""
    calls = sorted({r["calls"] for r in rows})
    out = []
    for d in sorted({r["direction"] for r in rows}):
        out += [f"**{d}**", "", "| training / sampler | " + " | ".join(f"{c} calls" for c in calls) + " |",
                "|---|" + "---|" * len(calls)]
        for key in sorted({(r["training"], r["sampler"]) for r in rows if r["direction"] == d}):
            cells = []
            for c in calls:
                hit = [r for r in rows if r["direction"] == d and (r["training"], r["sampler"], r["calls"])
                       == (*key, c)]
                cells.append(f"{hit[0]['ssim']:.3f} ({hit[0]['psnr']:.1f})" if hit else "")
            out.append(f"| {key[0]} / {key[1]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling_steps", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/sampling-steps"), help="run folders (reused)")
    p.add_argument("--cpu-seconds", type=float, default=420.0, help="train.max_cpu_seconds of every run")
    p.add_argument("--jobs", type=int, default=4, help="child processes at once (one thread each)")
    p.add_argument("--docs", type=Path, default=Path("docs/sampling"), help="where steps.jsonl/png go")
    p.add_argument("--calls", type=int, nargs="+", default=list(CALLS), help="network-call counts to score")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    rows = run_study(args.out, args.cpu_seconds, args.overrides, args.jobs, tuple(args.calls))
    (args.docs / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, args.docs / "steps.png")
    (args.docs / "steps.md").write_text(table_markdown(rows))
    for r in rows:
        print(f"{r['direction']} {r['training']:5s} {r['sampler']:5s} {r['calls']:3d} calls: SSIM {r['ssim']:.4f} "
              f"PSNR {r['psnr']:.2f} (sample {r['cpu_s_sample']:.1f} CPU-s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
