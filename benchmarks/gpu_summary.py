"""Helpers of ``benchmarks/gpu_check.sh``: the environment record, synthetic volumes, row checks, the report.

``python -m benchmarks.gpu_summary env OUT.json --device cuda``: GPU, driver, torch, CUDA, cuDNN (fails where
CUDA was asked for and is absent). ``volumes DIR --size N``: five synthetic heads for the training run.
``rows FILE.jsonl``: a ``bench memory`` result is usable (every row ok, skipped or out of memory, one ok at
least). ``train METRICS SUMMARY --steps N``: the training run's summary. ``report OUTDIR``: gpu_check.json and
SUMMARY.md from everything the check wrote, with the issue-28 goals checked where their rows exist.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Issue 28's goals, checked from the rows of the check (None where a row is missing).
GOAL_256_STEP_GIB = 12.0  # a memory-efficient IDMUNet training step at 256^3
GOAL_MAX_CUBE = 384  # the largest trainable cube within 80 GB
GOAL_TIME_VS_PLAIN = 1.4  # memory-efficient step time / plain IDMUNet step time
GOAL_TIME_VS_MONAI_CKPT = 1.0  # memory-efficient step time / checkpointed MONAI step time
GOAL_PEAK_VS_MONAI_CKPT_128 = 0.15  # memory-efficient peak / checkpointed MONAI peak at 128^3
USABLE = ("ok", "skipped", "oom")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file, one a line; ``[]`` where it is missing."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _nvidia_smi() -> dict[str, str] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    fields = [f.strip() for f in out.splitlines()[0].split(",")] if out else []
    return dict(zip(("name", "driver", "memory_total", "power_limit"), fields)) if len(fields) == 4 else None


def environment(device: str) -> dict[str, Any]:
    import torch

    from idm3d.bench.report import machine_info

    info = machine_info(device)
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    info.update(
        python_executable=sys.executable,
        cuda_available=torch.cuda.is_available(),
        cudnn=torch.backends.cudnn.version() if cuda else None,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        bf16_supported=bool(cuda and torch.cuda.is_bf16_supported()),
        gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        driver=None,
        nvidia_smi=_nvidia_smi(),
    )
    for name in ("monai", "numpy", "nibabel", "pynvml"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "present")
        except ImportError:
            info[name] = None
    if info["nvidia_smi"]:
        info["driver"] = info["nvidia_smi"]["driver"]
    elif info["pynvml"] and cuda:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    return info


def write_volumes(root: Path, n: int, cases: int = 5) -> None:
    """Synthetic "heads": a smooth ellipsoid with a noisy texture, so every case passes the data checks."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij"))
    for i in range(cases):
        radii = rng.uniform(0.6, 0.85, size=(3, 1, 1, 1))
        inside = ((grid / radii) ** 2).sum(0) < 1
        vol = inside * (100 + 20 * np.sin(4 * grid[0] + i) + rng.normal(0, 5, (n, n, n)))
        (root / f"case{i}").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), root / f"case{i}" / "t1.nii.gz")
    print(f"wrote {cases} cases of {n}^3 under {root}")


def check_rows(path: Path) -> str | None:
    """``None`` where a bench memory result is usable, else why not."""
    rows = read_jsonl(path)
    if not rows:
        return f"no rows in {path}"
    bad = [f"{r.get('net')} {r.get('size')}^3: {r.get('status')} {r.get('error', '')}" for r in rows
           if r.get("status") not in USABLE]  # fmt: skip
    if bad:
        return "; ".join(bad)
    if not any(r.get("status") == "ok" for r in rows):
        return f"no configuration of {path.name} ran"
    return None


def train_summary(metrics: Path, steps: int) -> tuple[dict[str, Any], str | None]:
    rows = read_jsonl(metrics)
    losses = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    summary = {
        "records": len(rows),
        "last_step": max((r.get("step", 0) for r in rows), default=0),
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "all_finite": all(math.isfinite(r["loss"]) for r in losses),
        "steps_per_s": losses[-1].get("steps_per_s") if losses else None,
        "max_mem_mb": max((r.get("mem_mb") or 0 for r in rows), default=None),
    }
    if not losses or not summary["all_finite"] or summary["last_step"] < steps:
        return summary, f"training run incomplete or non-finite: {summary}"
    return summary, None


def _row(rows: list[dict[str, Any]], net: str, size: int) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("net") == net and r.get("size") == size and r.get("status") == "ok"), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goals(memory: list[dict[str, Any]], max_size: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 28's goals: each with its measured value (None where its rows are missing) and whether it is met."""

    def field(net: str, size: int, key: str) -> float | None:
        row = _row(memory, net, size)
        return row.get(key) if row else None

    def goal(value: float | None, limit: float, at_most: bool = True) -> dict[str, Any]:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        return {"value": value, "limit": limit, "met": met}

    peak_256 = field("idm", 256, "peak_growth_mib")
    idm_max = next((r.get("max_size") for r in max_size if r.get("net") == "idm"), None)
    out = {
        "step_256_gib": goal(None if peak_256 is None else peak_256 / 1024, GOAL_256_STEP_GIB),
        "largest_cube": goal(idm_max, GOAL_MAX_CUBE, at_most=False),
        "peak_vs_monai_ckpt_128": goal(
            _ratio(field("idm", 128, "peak_growth_mib"), field("monai-ckpt", 128, "peak_growth_mib")),
            GOAL_PEAK_VS_MONAI_CKPT_128,
        ),
    }
    for size in sorted({r.get("size") for r in memory if r.get("net") == "idm"} - {None}):
        out[f"time_vs_plain_{size}"] = goal(
            _ratio(field("idm", size, "step_s"), field("idm-plain", size, "step_s")), GOAL_TIME_VS_PLAIN
        )
        out[f"time_vs_monai_ckpt_{size}"] = goal(
            _ratio(field("idm", size, "step_s"), field("monai-ckpt", size, "step_s")), GOAL_TIME_VS_MONAI_CKPT
        )
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _bench_table(rows: list[dict[str, Any]], title: str) -> list[str]:
    if not rows:
        return [f"### {title}", "", "(no rows)", ""]
    head = "| net | size | status | peak growth MiB | step s | energy J/step | GPU °C max | W mean |"
    lines = [f"### {title}", "", head, "|" + "---|" * 8]
    for r in rows:
        keys = ("status", "peak_growth_mib", "step_s", "energy_j_per_step", "gpu_temp_c_max", "gpu_power_w_mean")
        cells = [r.get("label") or r.get("net"), f"{r.get('size')}^3", *(r.get(k) for k in keys)]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return [*lines, ""]


def report(outdir: Path, dry: bool) -> dict[str, Any]:
    env = json.loads((outdir / "env.json").read_text()) if (outdir / "env.json").is_file() else {}
    steps = read_jsonl(outdir / "steps.jsonl")
    memory = read_jsonl(outdir / "memory.jsonl")
    max_size = read_jsonl(outdir / "max_size.jsonl")
    train = (
        json.loads((outdir / "train_summary.json").read_text()) if (outdir / "train_summary.json").is_file() else None
    )
    result = {
        "dry_run": dry,
        "gpu": env.get("gpu"),
        "driver": env.get("driver"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "cudnn": env.get("cudnn"),
        "environment": env,
        "steps": steps,
        "all_steps_ok": bool(steps) and all(s["rc"] == 0 for s in steps),
        "goals": goals(memory, max_size),
        "train": train,
        "max_size": [{k: r.get(k) for k in ("net", "max_size", "hit_max", "peak_growth_mib_at_max")} for r in max_size],
    }
    (outdir / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    lines = [
        "# idm3d GPU check" + (" (DRY RUN on CPU at tiny sizes: no GPU figure)" if dry else ""),
        "",
        f"GPU: {env.get('gpu') or 'none'}, driver {env.get('driver') or '-'}, torch {env.get('torch')}, "
        f"CUDA {env.get('cuda') or '-'}, cuDNN {env.get('cudnn') or '-'}, cuDNN TF32 {env.get('cudnn_allow_tf32')}.",
        "",
        "## Steps",
        "",
        "| step | status | seconds | timeout s |",
        "|---|---|---|---|",
    ]
    for s in steps:
        status = "ok" if s["rc"] == 0 else ("TIMED OUT" if s["rc"] in (124, 137) else f"FAILED (exit {s['rc']})")
        lines.append(f"| {s['step']} | {status} | {s['seconds']} | {s['timeout_s']} |")
    lines += ["", "## Issue 28 goals", "", "| goal | value | limit | met |", "|---|---|---|---|"]
    for name, g in result["goals"].items():
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        lines.append(f"| {name} | {_fmt(g['value'])} | {g['limit']} | {met} |")
    lines.append("")
    lines += _bench_table(memory, "Training step (fp32)")
    lines += _bench_table(read_jsonl(outdir / "memory_bf16.jsonl"), "Training step (bf16 autocast)")
    lines += _bench_table(read_jsonl(outdir / "inference.jsonl"), "Inference (one no-grad denoiser call)")
    lines += ["### Largest trainable cube", "", "| net | largest | peak growth MiB there |", "|---|---|---|"]
    lines += [
        f"| {r['net']} | {_fmt(r['max_size'])} | {_fmt(r['peak_growth_mib_at_max'])} |" for r in result["max_size"]
    ]
    lines += ["", "### bf16 training run", "", f"`{json.dumps(train)}`", ""]
    (outdir / "SUMMARY.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("volumes")
    p.add_argument("root", type=Path)
    p.add_argument("--size", type=int, default=96)
    p = sub.add_parser("rows")
    p.add_argument("path", type=Path)
    p = sub.add_parser("train")
    p.add_argument("metrics", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, required=True)
    p = sub.add_parser("report")
    p.add_argument("outdir", type=Path)
    p.add_argument("--dry", default="0")
    args = parser.parse_args(argv)

    if args.command == "env":
        info = environment(args.device)
        args.out.write_text(json.dumps(info, indent=2, default=str) + "\n")
        print(json.dumps(info, default=str))
        if args.device.startswith("cuda") and not info["cuda_available"]:
            print("CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
            return 1
        return 0
    if args.command == "volumes":
        write_volumes(args.root, args.size)
        return 0
    if args.command == "rows":
        problem = check_rows(args.path)
        if problem:
            print(f"rows: {problem}", file=sys.stderr)
        return 1 if problem else 0
    if args.command == "train":
        summary, problem = train_summary(args.metrics, args.steps)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
        if problem:
            print(problem, file=sys.stderr)
        return 1 if problem else 0
    report(args.outdir, args.dry == "1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
