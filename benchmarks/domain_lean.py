"""``python -m benchmarks.domain_lean``: per-rank memory of one no-grad IDMUNet call, whole or depth-sharded.

Configurations (``--modes``), each in fresh processes (gloo, ``--threads`` intra-op threads per rank),
the default ``IDMUNet()`` (fp32, batch 1, eval) on one ``S^3`` volume:

* ``lean``: one process, the in-place no-grad path (:mod:`idm3d.invertible.inplace`);
* ``plain``: one process, the ordinary no-grad forward (a no-op forward hook turns the in-place path off);
* ``twin-R``: ``R`` ranks, the sharded twin (:func:`idm3d.domain.twin.sharded_twin`), whose hooks make
  every call the ordinary forward on the rank's slices (what depth-sharded sampling ran before);
* ``lean-R``: ``R`` ranks, :class:`idm3d.domain.lean.LeanShardedNet`, the in-place path on the slices.

Each rank reports the RSS high-water mark of the measured call above its RSS right before it
(``VmHWM`` after ``clear_refs``, glibc's mmap threshold fixed so freed maps leave the RSS) and its CPU
seconds; the table gives the largest rank's figures and their ratio to ``lean``.

The in-place path runs a sub-network, stem or head whole (through its modules) while its full-size
temporaries fit ``work_bytes`` (256 MiB by default): a shard that small needs no slab path, so at 128³
``lean-R`` and ``twin-R`` coincide; ``--work-mib`` sets a smaller allowance, as a volume larger than
the budget meets it, to show the per-rank peak the slab path reaches.
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

from idm3d.allocator import tune_malloc
from idm3d.bench.harness import reset_peak_rss
from idm3d.children import status_kib

__all__ = ["add_arguments", "run"]


def _worker(rank: int, mode: str, ranks: int, size: int, threads: int, warmup: int, work: int | None, init: str,
            out: str) -> None:
    tune_malloc()
    torch.set_num_threads(threads)
    from idm3d.domain import scatter_depth
    from idm3d.domain.lean import LeanShardedNet
    from idm3d.domain.twin import sharded_twin
    from idm3d.invertible.inplace import inference_budget
    from idm3d.nets.idm_unet import IDMUNet

    if ranks > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=ranks)
    torch.manual_seed(0)
    net = IDMUNet().eval()
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    if mode == "plain":
        net.register_forward_hook(lambda *args: None)
    elif mode.startswith("twin"):
        net, x = sharded_twin(net), scatter_depth(x, multiple=net.size_multiple)
    elif mode.startswith("lean-"):
        net, x = LeanShardedNet(net), scatter_depth(x, multiple=net.size_multiple)
    records = []
    for i in range(warmup + 1):
        if ranks > 1:
            dist.barrier()
        reset_peak_rss()
        base = (status_kib("VmRSS") or 0) * 1024
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad(), inference_budget(work_bytes=None if work is None else work * 2**20):
            y = net(x, t)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = (status_kib("VmHWM") or 0) * 1024
        del y
        records.append({"call": i, "wall_s": wall, "cpu_s": cpu, "peak_mib": (peak - base) / 2**20})
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "records": records}))
    if ranks > 1:
        dist.destroy_process_group()


def _measure(mode: str, size: int, threads: int, warmup: int, work: int | None) -> dict[str, Any]:
    ranks = int(mode.split("-")[1]) if "-" in mode else 1
    with tempfile.TemporaryDirectory() as tmp:
        args = (mode, ranks, size, threads, warmup, work, str(Path(tmp) / "init"), tmp)
        mp.spawn(_worker, args=args, nprocs=ranks, join=True)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]
    last = [r["records"][-1] for r in per_rank]
    return {"mode": mode, "ranks": ranks, "size": size, "threads_per_rank": threads, "warmup": warmup, "work_mib": work,
            "peak_mib": max(rec["peak_mib"] for rec in last), "cpu_s": max(rec["cpu_s"] for rec in last),
            "wall_s": max(rec["wall_s"] for rec in last), "per_rank": per_rank}


def _markdown(rows: list[dict[str, Any]], command: str, load: str) -> str:
    header = (
        "# One no-grad denoiser call, whole and depth-sharded: per-rank memory (`benchmarks/domain_lean.py`)\n\n"
        f"Command: `{command}`. Default `IDMUNet()` (32 channels, 4 levels, channel attention), fp32, batch 1; "
        "one fresh process per rank (gloo). Peak: RSS high-water mark of the measured call (after the warm-up "
        "calls) above the RSS right before it, the largest rank's. `lean`: one process, in-place path; `plain`: "
        "one process, ordinary forward; `twin-R`: R ranks, the sharded twin (ordinary forward on the slices, "
        f"what sampling ran before); `lean-R`: R ranks, `LeanShardedNet` (in-place path on the slices). {load}\n"
    )
    lines = [header, "| size | mode | R | peak MiB/rank | x lean | CPU s/rank | wall s |", "|" + "---|" * 7]
    base = {r["size"]: r for r in rows if r["mode"] == "lean"}
    for r in rows:
        b = base.get(r["size"])
        ratio = f"{r['peak_mib'] / b['peak_mib']:.2f}" if b else "-"
        lines.append(f"| {r['size']}³ | {r['mode']} | {r['ranks']} | {r['peak_mib']:.0f} | {ratio} "
                     f"| {r['cpu_s']:.1f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["lean", "plain", "twin-2", "lean-2", "twin-4", "lean-4"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--warmup", type=int, default=1, help="calls before the measured one")
    parser.add_argument("--work-mib", type=int, default=None,
                        help="the in-place path's work_bytes in MiB (inference_budget; default: its own, 256)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/domain-lean-128"), help="writes OUT.json, OUT.md")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = [_measure(mode, args.size, args.threads, args.warmup, args.work_mib) for mode in args.modes]
    report = {
        "command": "python -m benchmarks.domain_lean " + " ".join(sys.argv[1:]),
        "load": f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine).",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = _markdown(rows, report["command"], report["load"])
    args.out.with_suffix(".md").write_text(text)
    print(text, flush=True)
    return rows

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args())
