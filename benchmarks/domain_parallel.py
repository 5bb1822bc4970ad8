"""``python -m benchmarks.domain_parallel``: per-rank memory and time of a depth-sharded IDMUNet training step.

For each ``R`` of ``--ranks``, ``R`` fresh processes (gloo, ``--threads`` intra-op threads each) train
the default ``IDMUNet()`` (fp32, batch 1, memory-efficient) on depth shards of one ``S^3`` volume:
``R = 1`` is the plain unsharded model, the baseline. Each rank reports the RSS high-water mark of a
step above its RSS before the step's first allocation (``VmHWM`` after ``clear_refs``, glibc's mmap
threshold fixed so freed maps leave the RSS), its wall and CPU seconds per step, and the bytes it sent
by kind (halo planes, GroupNorm statistics, Gram matrices and gathered maps, the gradient sum). The
table reports the largest rank's figures and their ratio to ``R = 1``.

The halo bytes are also stated from the shapes (:func:`idm3d.domain.halo_bytes`) and printed beside
the counted ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.domain_halo import halo_lines
from idm3d.allocator import tune_malloc
from idm3d.bench.harness import reset_peak_rss
from idm3d.children import current_rss_bytes, machine_available_bytes, status_kib

__all__ = ["add_arguments", "measure", "run"]


def _step(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor, group: Any) -> None:
    from idm3d.domain import sync_gradients

    net.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(net(x, t), target)
    loss.backward()
    if group is not None:
        sync_gradients(net, average=True)


def _worker(rank: int, ranks: int, size: int, threads: int, steps: int, warmup: int, init: str, out: str) -> None:
    tune_malloc()  # freed feature maps leave the RSS, so each step's high-water mark is its own
    torch.set_num_threads(threads)
    from idm3d.domain import COUNTER, halo_bytes, scatter_depth, shard
    from idm3d.nets.idm_unet import IDMUNet

    group = None
    if ranks > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=ranks)
        group = dist.group.WORLD
    torch.manual_seed(0)
    net = IDMUNet()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, size, size, size, generator=gen)
    target = torch.randn(1, 1, size, size, size, generator=gen)
    t = torch.tensor([500])
    if group is not None:
        shard(net)
        x, target = scatter_depth(x, multiple=net.size_multiple), scatter_depth(target)
    rss0 = (status_kib("VmRSS") or 0) * 1024
    records = []
    for i in range(warmup + steps):  # warm-up steps first (oneDNN primitives, allocator)
        if group is not None:
            dist.barrier()
        COUNTER.clear()
        if not reset_peak_rss():  # the high-water mark would be the process's, not the step's
            raise RuntimeError("/proc/self/clear_refs refused: cannot measure a step's peak RSS")
        base = (status_kib("VmRSS") or 0) * 1024
        Path(out, f"base{rank}.tmp").write_text(str(base))
        os.replace(Path(out, f"base{rank}.tmp"), Path(out, f"base{rank}"))  # whole, for the parent's watchdog
        wall, cpu = time.perf_counter(), time.process_time()
        _step(net, x, t, target, group)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = (status_kib("VmHWM") or 0) * 1024
        records.append({"step": i, "wall_s": wall, "cpu_s": cpu, "peak_above_step_start_mib": (peak - base) / 2**20,
                        "peak_above_model_mib": (peak - rss0) / 2**20, "rss_start_mib": base / 2**20,
                        "sent": dict(COUNTER)})
    stated = halo_bytes(net, (1, 1, size, size, size), ranks, rank, torch.float32, forward_passes=2, input_grad=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "records": records, "halo_stated": stated}))
    if group is not None:
        dist.destroy_process_group()


_FLOOR = 2**30  # a watched run stops when the machine has less memory available than this


def _watch(ctx: Any, tmp: str, budget: int | None, machine: int | None, poll_s: float) -> dict[str, Any]:
    """Wait for the ranks; stop them all once one grows past ``budget`` or together they pass ``machine``.

    Growth is a rank's RSS above the RSS its step started from (the file ``base{rank}`` it writes), the
    same quantity as its measured peak, sampled every ``poll_s``. With ``machine`` set, the ranks also
    stop when the machine's available memory falls under 1 GiB.

    Returns:
        ``{"status", "watched_growth_mib", "watched_total_mib"}``; ``status`` is ``ok``, ``over_budget``,
        ``over_machine`` or ``machine_low``.
    """
    pids = ctx.pids()
    growth = total_peak = 0
    status = "ok"
    while not ctx.join(timeout=poll_s):
        rss = [current_rss_bytes(pid) or 0 for pid in pids]
        total_peak = max(total_peak, sum(rss))
        for rank, now in enumerate(rss):
            base_file = Path(tmp, f"base{rank}")
            if base_file.exists():  # written whole (renamed into place)
                growth = max(growth, now - int(base_file.read_text()))
        if budget is not None and growth > budget:
            status = "over_budget"
        elif machine is not None and total_peak > machine:
            status = "over_machine"
        elif machine is not None and (machine_available_bytes() or _FLOOR) < _FLOOR:  # other users' memory counts too
            status = "machine_low"
        if status != "ok":
            for process in ctx.processes:
                process.kill()
            for process in ctx.processes:
                process.join()
            break
    return {"status": status, "watched_growth_mib": growth / 2**20, "watched_total_mib": total_peak / 2**20}


def measure(ranks: int, size: int, threads: int, steps: int, warmup: int, *, budget: int | None = None,
            machine: int | None = None, poll_s: float = 0.05) -> dict[str, Any]:
    """One configuration's row: ``ranks`` fresh processes train ``warmup + steps`` steps on an ``size^3`` volume.

    Args:
        ranks: processes (``R``); 1 is the plain unsharded model.
        size: the cube's edge.
        threads: intra-op threads per rank.
        steps: measured steps, after ``warmup`` unmeasured ones.
        warmup: unmeasured steps first (0: the first step is measured).
        budget: stop all ranks once one's growth above its step's start passes this many bytes.
        machine: stop all ranks once their summed RSS passes this many bytes.
        poll_s: the watchdog's sampling interval.

    Returns:
        The row; a stopped run has only the configuration, ``status`` and the watchdog's figures.
    """
    with tempfile.TemporaryDirectory() as tmp:
        args = (ranks, size, threads, steps, warmup, str(Path(tmp) / "init"), tmp)
        ctx = mp.start_processes(_worker, args=args, nprocs=ranks, join=False, start_method="spawn")
        watched = _watch(ctx, tmp, budget, machine, poll_s)
        config = {"ranks": ranks, "size": size, "threads_per_rank": threads, "steps": steps, "warmup": warmup}
        if watched["status"] != "ok":
            return {**config, **watched}
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]
    measured = [rec for r in per_rank for rec in r["records"][warmup:]]
    row = {
        **config, **watched,
        "peak_mib": max(rec["peak_above_step_start_mib"] for rec in measured),
        "peak_above_model_mib": max(rec["peak_above_model_mib"] for rec in measured),
        "wall_s": max(rec["wall_s"] for rec in measured),
        "cpu_s": max(rec["cpu_s"] for rec in measured),
        "halo_mib": max(rec["sent"].get("halo", 0) for rec in measured) / 2**20,
        "halo_stated_mib": max(r["halo_stated"] for r in per_rank) / 2**20,
        "other_mib": max(sum(v for k, v in rec["sent"].items() if k != "halo") for rec in measured) / 2**20,
        "rss_start_mib": max(rec["rss_start_mib"] for rec in measured),
        "per_rank": per_rank,
    }
    return row


def _markdown(rows: list[dict[str, Any]], command: str, load: str) -> str:
    warmup = rows[0].get("warmup", 1) if rows else 1  # files written before --warmup had one
    measured = "first step, no warm-up" if warmup == 0 else f"after {warmup} warm-up step(s)"
    lines = [
        "# Depth-sharded training step: per-rank memory and time (`benchmarks/domain_parallel.py`)",
        "",
        f"Command: `{command}`. Default `IDMUNet()` (32 channels, 4 levels, channel attention), fp32, batch 1,",
        "memory-efficient; one process per rank (gloo), the figures of the largest rank over the measured steps",
        f"({measured}). Peak: RSS high-water mark of a step above its start. Halo: bytes one rank",
        "sent as halo planes per step (counted; stated from the shapes in brackets); other: GroupNorm",
        f"statistics, Gram matrices, gathered maps and the gradient sum. {load}",
        "",
        "| size | R | threads/rank | peak MiB | x R=1 | step wall s | CPU s/rank | x R=1 (CPU) "
        "| halo MiB (stated) | other MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["size"]: r for r in rows if r["ranks"] == 1}
    for r in rows:
        b = base.get(r["size"])
        mem = f"{r['peak_mib'] / b['peak_mib']:.2f}" if b else "-"
        cpu = f"{r['cpu_s'] / b['cpu_s']:.2f}" if b else "-"
        lines.append(
            f"| {r['size']}³ | {r['ranks']} | {r['threads_per_rank']} | {r['peak_mib']:.0f} | {mem} "
            f"| {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {cpu} | {r['halo_mib']:.2f} ({r['halo_stated_mib']:.2f}) "
            f"| {r['other_mib']:.2f} |"
        )
    for size in sorted({r["size"] for r in rows}):
        lines += ["", *halo_lines(size)]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (after the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured steps first; 0 measures the first step (its peak includes first-call caches)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/domain-parallel-64"),
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite OUT.md from OUT.json")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.render:
        data = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(_markdown(data["rows"], data["command"], data["load"]))
        return data["rows"]
    rows = []
    for size in args.sizes:
        for ranks in args.ranks:
            row = measure(ranks, size, args.threads, args.steps, args.warmup)
            print(f"size {size} R {ranks}: peak {row['peak_mib']:.0f} MiB, wall {row['wall_s']:.2f} s, "
                  f"CPU {row['cpu_s']:.2f} s, halo {row['halo_mib']:.2f} MiB", flush=True)
            rows.append(row)
    load = f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)."
    command = "python -m benchmarks.domain_parallel " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "load": load, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(_markdown(rows, command, load))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args())
