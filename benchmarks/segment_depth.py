"""``python -m benchmarks.segment_depth``: does training memory stay flat as an invertible segment gets deeper?

A segment of ``N`` and ``2N`` additive couplings (alternating sides, conditioned by a
timestep-embedding-like vector) is trained for one step, memory-efficient and under plain
autograd, each configuration in a fresh process. With the memory-efficient backward the peak
memory growth of a step should barely change from ``N`` to ``2N`` blocks; with plain autograd it
should about double. The price is the time ratio memory-efficient / plain.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.step_report import add_step_arguments, check_counts, report, step_columns, step_config
from idm3d.bench.harness import (
    Column,
    add_common_arguments,
    machine_info,
    measure_training_step,
    progress,
    ratio,
    resolve_device,
    run_config,
)
from idm3d.errors import ConfigError

__all__ = ["CoreModel", "add_arguments", "child", "run"]

MODES = ("memory_efficient", "plain")


class CoreModel(nn.Module):
    """An embedding MLP feeding every coupling of one invertible segment (the benchmarked core)."""

    def __init__(self, blocks: int, channels: int, emb_dim: int, memory_efficient: bool) -> None:
        super().__init__()
        from idm3d.invertible import AdditiveCoupling, InvertibleSequence

        # Like a timestep embedding, the conditioning comes out of trainable layers, so its
        # gradient is accumulated over every block.
        self.embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.segment = InvertibleSequence(
            [AdditiveCoupling(channels, cond_dim=emb_dim, flip=bool(i % 2)) for i in range(blocks)],
            memory_efficient=memory_efficient,
        )

    def forward(self, x: Tensor, features: Tensor) -> Tensor:
        return self.segment(x, self.embed(features))


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration and measure its training step (runs in a fresh process)."""
    device = torch.device(config["device"])
    torch.manual_seed(0)
    efficient = config["mode"] == "memory_efficient"
    model = CoreModel(config["blocks"], config["channels"], config["emb_dim"], efficient).to(device)
    size, batch = config["size"], config["batch"]
    x = torch.randn(batch, config["channels"], size, size, size, device=device)
    features = torch.randn(batch, config["emb_dim"], device=device)

    def step() -> None:
        out = model(x, features)
        # A loss that is not linear in the output, so every coupling sees a nonzero gradient.
        out.square().mean().backward()

    result = measure_training_step(
        model, step, device, warmup=config["warmup"], repeats=config["repeats"], count_flops=config["count_flops"]
    )
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m benchmarks.segment_depth``."""
    parser.add_argument("--blocks", type=int, default=4, help="N: segments of N and 2N couplings (default 4)")
    parser.add_argument("--size", type=int, default=64, help="cube edge length (default 64)")
    parser.add_argument("--channels", type=int, default=32, help="feature channels (default 32)")
    parser.add_argument("--emb-dim", type=int, default=128, help="conditioning vector size (default 128)")
    add_step_arguments(parser)
    add_common_arguments(parser)


def _check(args: argparse.Namespace) -> None:
    check_counts(args, ("blocks", "size", "channels", "emb_dim", "batch", "repeats"))
    if args.channels < 2:
        raise ConfigError(f"--channels: a coupling needs at least 2 channels, got {args.channels}")


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_key = {(r["mode"], r["blocks"]): r for r in rows}
    blocks = sorted({r["blocks"] for r in rows})
    for r in rows:
        plain = by_key.get(("plain", r["blocks"]), {})
        r["time_ratio_vs_plain"] = ratio(r.get("step_s"), plain.get("step_s"))
        r["growth_ratio_vs_plain"] = ratio(r.get("peak_growth_mib"), plain.get("peak_growth_mib"))
        first = by_key.get((r["mode"], blocks[0]), {})
        r["growth_ratio_vs_n"] = ratio(r.get("peak_growth_mib"), first.get("peak_growth_mib"))


COLUMNS = (
    Column("mode", "mode"),
    Column("blocks", "blocks"),
    *step_columns(".3f", ".1f"),
    Column("time_ratio_vs_plain", "time / plain", ".2f"),
    Column("growth_ratio_vs_plain", "growth / plain", ".2f"),
    Column("growth_ratio_vs_n", "growth / growth(N)", ".2f"),
)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m benchmarks.segment_depth``; prints markdown (or JSON lines with ``--json``)."""
    _check(args)
    device = resolve_device(args.device)
    info = machine_info(device)
    rows: list[dict[str, Any]] = []
    for blocks in (args.blocks, 2 * args.blocks):
        for mode in MODES:
            config = {
                "bench": "core",
                "mode": mode,
                "blocks": blocks,
                "size": args.size,
                "channels": args.channels,
                "emb_dim": args.emb_dim,
                **step_config(args, device),
            }
            progress(f"bench core: {mode}, {blocks} blocks, {args.size}^3 ...")
            rows.append(run_config("benchmarks.segment_depth:child", config, timeout_s=args.timeout))
    _add_ratios(rows)
    for r in rows:
        if isinstance(r.get("flops"), (int, float)):
            r["gflops"] = r["flops"] / 1e9
    title = (
        f"## segment depth: {args.blocks} vs {2 * args.blocks} couplings, {args.channels} channels, "
        f"{args.size}^3, batch {args.batch}"
    )
    return report(rows, args, info, COLUMNS, [title], _notes(rows, args))


def _notes(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The ratios the study is about, then each configuration that failed."""
    out = []
    by_key = {(r["mode"], r["blocks"]): r for r in rows}
    for blocks in (args.blocks, 2 * args.blocks):
        t = by_key[("memory_efficient", blocks)].get("time_ratio_vs_plain")
        out.append(f"- time memory-efficient / plain at {blocks} blocks: {_fmt(t)}")
    for mode in MODES:
        g = by_key[(mode, 2 * args.blocks)].get("growth_ratio_vs_n")
        out.append(f"- peak growth {2 * args.blocks} / {args.blocks} blocks, {mode}: {_fmt(g)}")
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"- {r['mode']} {r['blocks']} blocks failed: {r.get('status')}: {r.get('error')}")
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    from benchmarks import main

    sys.exit(main(sys.modules[__name__]))
