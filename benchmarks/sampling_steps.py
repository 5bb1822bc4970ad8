"""``python -m benchmarks.sampling_steps``: held-out quality against network calls, DDPM vs rectified flow.

The ``make run`` task (``configs/demo.yaml``, T1 -> T2 and T2 -> T1 on the MNI template), trained twice per
direction for the same CPU budget (``train.max_cpu_seconds``, so the result does not depend on the load of
the machine): once with the demo's DDPM objective, once with rectified flow (``diffusion.kind: rflow``, every
other setting the demo's). Each run is scored on the held-out band as ``idm3d evaluate`` scores it, at
1, 2, 4, 8, 16, 32 network calls (DDIM for DDPM; Euler and Heun for the flow) plus the goal's reference
(DDIM, 10 calls: the demo's default until 2026-12-06). One JSON line per point goes to
``docs/sampling/steps.jsonl``; ``docs/sampling/steps.png`` plots them and ``steps.md`` tabulates them, with
the means over rows tagged ``seed<N>`` (``--tag``, repeats with ``--set train.seed=N``).
Training and scoring run in child processes, one thread each (the demo's layout on 2 cores).
Run again with the same ``--out`` and the trained runs are reused.

``--objectives`` picks the runs: ``ddpm``, ``rflow`` (the demo with the flow objective) and flow variants that
change one thing of ``rflow``: ``rflow-logit`` (MONAI's ``sample_method: logit-normal`` training
timesteps), ``rflow-warp`` (MONAI's ``use_timestep_transform``: more time near noise for volumes larger than
``base_img_size_numel``), ``rflow-x0`` (the network predicts x0, ``diffusion.prediction_type: sample``, as
the demo's DDPM runs do; its velocity is ``(x0_hat - x_t) / s``), ``rflow-x0-warp`` (both) and
``rflow-x0-shift``/``-shift6``/``-shift10`` (x0 with MONAI's warp at a small ``base_img_size_numel``: the
training timesteps and the sampling grid moved towards noise by a ratio of 3-4, 5-6 and 8-10, where the demo's
DDPM schedule spends its steps).
``--append`` adds the points to ``steps.jsonl`` instead of replacing it; every row records the command that
wrote it. The table and plot are drawn from all rows of the file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.objectives import DDPM_DEMO, FLOW

CALLS = (1, 2, 4, 8, 16, 32)
DEFAULT_POINT = ("ddpm", "ddim", 10)  # the goal's reference: DDPM-trained, DDIM with 10 calls
OBJECTIVES = {"ddpm": DDPM_DEMO, "rflow": FLOW}  # benchmarks.objectives: the demo's DDPM predecessor; MONAI's flow
_X0 = ["diffusion.prediction_type=sample"]  # the network predicts x0, as the demo's DDPM runs do
_WARP = ["diffusion.use_timestep_transform=true"]
VARIANTS = {  # flow variants: the rflow run with more overrides
    "rflow-logit": ["diffusion.sample_method=logit-normal"],
    "rflow-warp": _WARP,
    "rflow-x0": _X0,
    "rflow-x0-warp": [*_X0, *_WARP],
    # MONAI's warp with a small reference size: ratio (64*64*16 / 1920)^(1/3) = 3.2 on the training patches and
    # (80*96*16 / 1920)^(1/3) = 4.0 on the held-out band, about the noise levels of the demo's DDPM schedule
    "rflow-x0-shift": [*_X0, *_WARP, "diffusion.base_img_size_numel=1920"],
    # a stronger warp: ratio 4.8 on the training patches, 5.9 on the held-out band
    "rflow-x0-shift6": [*_X0, *_WARP, "diffusion.base_img_size_numel=600"],
    # stronger still: ratio 8.0 on the training patches, 9.9 on the held-out band
    "rflow-x0-shift10": [*_X0, *_WARP, "diffusion.base_img_size_numel=128"],
}
for _name, _extra in VARIANTS.items():
    OBJECTIVES[_name] = [*OBJECTIVES["rflow"], *_extra]
SAMPLERS = {name: ("ddim",) if name == "ddpm" else ("euler", "heun") for name in OBJECTIVES}
# Heun's schedule: until 2026-12 an even budget ended with a Heun step whose corrector sat at t = 0 ("v1");
# now every budget ends with an Euler step (idm3d.diffusion.solvers, "euler-last").
HEUN_SCHEDULE = "euler-last"
CALL_256 = "docs/bench/sampling-256.jsonl"  # one no-grad 256^3 IDMUNet() call, 2 CPU cores: its wall seconds


def seconds_per_call_256() -> float:
    """Wall seconds of one whole-volume 256³ call, as measured in :data:`CALL_256` (the 256³ time estimate)."""
    rows = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / CALL_256).read_text().splitlines()
            if line.strip()]
    return next(r["first_step_s"] for r in rows if r.get("net") == "idm" and r.get("size") == 256)


def _configs(
    cpu_seconds: float, overrides: list[str], objectives: tuple[str, ...], directions: tuple[str, ...]
) -> dict[tuple[str, str], Any]:
    from idm3d.demo.pipeline import demo_config, direction_config

    out = {}
    for objective in objectives:
        extra = OBJECTIVES[objective]
        cfg = demo_config(None, [*extra, *overrides, "train.progress=false"], minutes=cpu_seconds / 60.0)
        for direction in directions:
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
            "direction": job["direction"], "training": "ddpm" if job["objective"] == "ddpm" else "rflow",
            "variant": job["objective"], "sampler": sampler, "calls": calls,
            "ssim": summary["ssim_mask"]["mean"], "psnr": summary["psnr_mask"]["mean"],
            "ssim_all": summary["ssim"]["mean"], "psnr_all": summary["psnr"]["mean"],
            "cpu_s_train": float(state.cpu_s), "train_steps": state.step,
            "cpu_s_sample": (time.process_time() - cpu) / n, "wall_s_sample": (time.monotonic() - wall) / n,
            "threads": 1, "metric": "held-out band, inside the brain mask, mean over cases",
            **({"heun_schedule": HEUN_SCHEDULE} if sampler == "heun" else {}),
        })
    return rows


def run_study(
    out: Path, cpu_seconds: float, overrides: list[str], jobs: int, calls: tuple[int, ...] = CALLS,
    objectives: tuple[str, ...] = ("ddpm", "rflow"), directions: tuple[str, ...] = ("t1-t2", "t2-t1"),
) -> list[dict[str, Any]]:
    """Train the runs (reusing finished ones), score every point, return the JSON rows."""
    import torch

    from idm3d.demo.parallel import train_all

    configs = _configs(cpu_seconds, overrides, objectives, directions)
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
    with ProcessPoolExecutor(min(jobs, len(score_jobs))) as pool:
        rows = [r for rs in pool.map(_score, score_jobs) for r in rs]
    per_call = seconds_per_call_256()
    for row in rows:
        row["cpu_s_budget"] = cpu_seconds
        row["s_256_estimate"] = row["calls"] * per_call
    return rows


def series(row: dict[str, Any]) -> str:
    """A row's line in the table and plot: variant (tag) / sampler, Heun's old schedule marked ``v1``."""
    name = row.get("variant", row["training"]) + (f" [{row['tag']}]" if row.get("tag") else "")
    old = row["sampler"] == "heun" and row.get("heun_schedule") != HEUN_SCHEDULE
    return f"{name} / {row['sampler']}" + (" (v1)" if old else "")


def _repeat(row: dict[str, Any]) -> bool:
    return re.fullmatch(r"seed\d+", row.get("tag") or "") is not None


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """SSIM (brain) against network calls, one column per direction.

    Top: one line per run and sampler (rows not tagged ``seed<N>``). Bottom, when there are repeats: the
    mean over the seeds per objective and sampler, the band from the lowest to the highest seed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = sorted({r["direction"] for r in rows})
    single, repeats = [r for r in rows if not _repeat(r)], [r for r in rows if _repeat(r)]
    panels = [single] + ([repeats] if repeats else [])
    fig, axes = plt.subplots(len(panels), len(directions), figsize=(5 * len(directions) + 2.5, 4.2 * len(panels)),
                             squeeze=False)
    for axes_row, group, averaged in zip(axes, panels, (False, True)):
        name = (lambda r: f"{r.get('variant', r['training'])} / {r['sampler']} (mean)") if averaged else series
        keys = sorted({name(r) for r in group})
        colours = {k: plt.get_cmap("tab20")(i % 20) for i, k in enumerate(keys)}
        for ax, d in zip(axes_row, directions):
            for key in keys:
                by_calls: dict[int, list[float]] = {}
                for r in group:
                    if r["direction"] == d and name(r) == key and r["calls"] != DEFAULT_POINT[2]:
                        by_calls.setdefault(r["calls"], []).append(r["ssim"])
                if not by_calls:
                    continue
                x = sorted(by_calls)
                ax.plot(x, [statistics.fmean(by_calls[c]) for c in x], marker="o", ms=3, lw=1, color=colours[key],
                        label=key, ls="--" if "heun" in key else "-")
                if averaged:
                    ax.fill_between(x, [min(by_calls[c]) for c in x], [max(by_calls[c]) for c in x],
                                    color=colours[key], alpha=0.12)
            ref = [r["ssim"] for r in group if r["direction"] == d
                   and (r["training"], r["sampler"], r["calls"]) == DEFAULT_POINT]
            if ref:
                ax.axhline(statistics.fmean(ref), color="grey", ls="--", lw=1,
                           label="DDPM, DDIM 10 calls" + (" (mean)" if averaged else ""))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("network calls")
            ax.set_ylabel("held-out SSIM (brain)")
            ax.set_title(f"{d}, " + ("repeats over seeds: mean, min-max band" if averaged else "single runs"))
            ax.grid(alpha=0.3)
        handles = {}
        for ax in axes_row:  # one legend per row (a variant may be in one direction only)
            handles.update(zip(ax.get_legend_handles_labels()[1], ax.get_legend_handles_labels()[0]))
        axes_row[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left",
                            bbox_to_anchor=(1.02, 1.0))
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
        for key in sorted({series(r) for r in rows if r["direction"] == d}):
            cells = []
            for c in calls:
                hit = [r for r in rows if r["direction"] == d and series(r) == key and r["calls"] == c]
                cells.append(f"{hit[-1]['ssim']:.3f} ({hit[-1]['psnr']:.1f})" if hit else "")
            out.append(f"| {key} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def seeds_markdown(rows: list[dict[str, Any]], calls: tuple[int, ...] = (1, 2, 3, 4, 10)) -> str:
    """Mean held-out brain SSIM [min, max] over the repeats tagged ``seed<N>`` (``--tag``), per direction."""
    tagged = [r for r in rows if _repeat(r)]
    if not tagged:
        return ""
    out = ["", "**Repeats** (rows tagged `seed<N>`: mean SSIM [min, max] over the seeds; n seeds)", ""]
    for d in sorted({r["direction"] for r in tagged}):
        out += [f"*{d}*", "", "| training / sampler | n | " + " | ".join(f"{c} calls" for c in calls) + " |",
                "|---|---|" + "---|" * len(calls)]
        for name, sampler in sorted({(r.get("variant", r["training"]), r["sampler"]) for r in tagged}):
            cells, seeds = [], set()
            for c in calls:
                hit = [r for r in tagged if r["direction"] == d and r.get("variant", r["training"]) == name
                       and r["sampler"] == sampler and r["calls"] == c]
                seeds |= {r["tag"] for r in hit}
                ssim = [r["ssim"] for r in hit]
                cells.append(f"{statistics.fmean(ssim):.3f} [{min(ssim):.3f}, {max(ssim):.3f}]" if ssim else "")
            out.append(f"| {name} / {sampler} | {len(seeds)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_docs(rows: list[dict[str, Any]], docs: Path) -> None:
    """``steps.png`` and ``steps.md`` (every row's table, then the repeats' means) from the rows."""
    plot(rows, docs / "steps.png")
    (docs / "steps.md").write_text(table_markdown(rows) + seeds_markdown(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling_steps", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/sampling-steps"), help="run folders (reused)")
    p.add_argument("--cpu-seconds", type=float, default=420.0, help="train.max_cpu_seconds of every run")
    p.add_argument("--jobs", type=int, default=4, help="child processes at once (one thread each)")
    p.add_argument("--docs", type=Path, default=Path("docs/sampling"), help="where steps.jsonl/png go")
    p.add_argument("--calls", type=int, nargs="+", default=list(CALLS), help="network-call counts to score")
    p.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES), default=["ddpm", "rflow"],
                   help="which runs to train and score (flow variants: see the module docstring)")
    p.add_argument("--directions", nargs="+", choices=("t1-t2", "t2-t1"), default=["t1-t2", "t2-t1"])
    p.add_argument("--append", action="store_true", help="add the points to steps.jsonl (default: replace it)")
    p.add_argument("--tag", default="", help="a label of these rows in the table (e.g. a repeat of a run)")
    p.add_argument("--replot", action="store_true", help="only redraw steps.md/png from steps.jsonl")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    path = args.docs / "steps.jsonl"
    if args.replot:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        write_docs(rows, args.docs)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    rows = run_study(args.out, args.cpu_seconds, args.overrides, args.jobs, tuple(args.calls),
                     tuple(args.objectives), tuple(args.directions))
    command = " ".join(["python -m benchmarks.sampling_steps", *(argv if argv is not None else sys.argv[1:])])
    for row in rows:
        row["command"] = command
        if args.tag:
            row["tag"] = args.tag
    before = path.read_text() if args.append and path.is_file() else ""
    path.write_text(before + "".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        print(f"{r['direction']} {series(r):24s} {r['calls']:3d} calls: SSIM {r['ssim']:.4f} "
              f"PSNR {r['psnr']:.2f} (sample {r['cpu_s_sample']:.1f} CPU-s)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    write_docs(rows, args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
