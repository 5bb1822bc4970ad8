"""``python -m benchmarks.attention``: invertible 3D attention against MONAI's spatial attention block.

One training step (forward, a squared loss, backward) of ``--depth`` stacked attention layers, per
volume size and channel count, each configuration in a fresh process (see
:mod:`idm3d.bench.harness`), for

* ``memory_efficient``: :class:`~idm3d.invertible.attention.InvertibleAttention3d` layers in an
  ``InvertibleSequence(memory_efficient=True)`` (activations rebuilt in backward);
* ``plain``: the same layers under plain autograd;
* ``monai``: ``monai.networks.blocks.SpatialAttentionBlock`` (the attention of MONAI's
  ``DiffusionModelUNet``: GroupNorm, full voxel x voxel self-attention, residual) of the same
  width, only up to ``--monai-max-tokens`` voxels (its attention matrix is quadratic in them).

The channel variant runs at ``--sizes``, the spatial one at ``--spatial-sizes``.
Run as ``python -m benchmarks.attention``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.step_report import add_step_arguments, check_counts, report, step_columns, step_config
from idm3d.bench.harness import (
    Column,
    add_common_arguments,
    machine_info,
    measure_training_step,
    parse_sizes,
    progress,
    ratio,
    resolve_device,
    run_config,
)
from idm3d.errors import ConfigError

__all__ = ["AttentionStack", "add_arguments", "build_model", "child", "main", "run"]

MODES = ("memory_efficient", "plain", "monai")
VARIANTS = ("channel", "spatial")
MODULE_NAMES = {"monai": "monai.SpatialAttentionBlock"}


class AttentionStack(nn.Module):
    """``depth`` invertible attention layers (alternating mask phase) fed by an embedding MLP."""

    def __init__(
        self, variant: str, channels: int, heads: int, depth: int, emb_dim: int, memory_efficient: bool, tokens: int
    ) -> None:
        super().__init__()
        from idm3d.invertible.attention import invertible_attention
        from idm3d.invertible.segment import InvertibleSequence

        # The conditioning comes out of trainable layers, as a timestep embedding would.
        self.embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        layers = [
            invertible_attention(
                channels, variant, heads, cond_dim=emb_dim, channel_alternating=bool(i % 2), max_tokens=tokens
            )
            for i in range(depth)
        ]
        self.segment = InvertibleSequence(layers, memory_efficient=memory_efficient)

    def forward(self, x: Tensor, features: Tensor) -> Tensor:
        return self.segment(x, self.embed(features))


class _MonaiStack(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int) -> None:
        super().__init__()
        from monai.networks.blocks import SpatialAttentionBlock

        groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
        self.blocks = nn.Sequential(
            *[
                SpatialAttentionBlock(3, channels, num_head_channels=channels // heads, norm_num_groups=groups)
                for _ in range(depth)
            ]
        )

    def forward(self, x: Tensor, features: Tensor) -> Tensor:  # MONAI's attention takes no embedding
        return self.blocks(x)


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model one configuration measures."""
    if config["mode"] == "monai":
        return _MonaiStack(config["channels"], config["heads"], config["depth"])
    tokens = max(4096, config["size"] ** 3)
    return AttentionStack(
        config["variant"],
        config["channels"],
        config["heads"],
        config["depth"],
        config["emb_dim"],
        config["mode"] == "memory_efficient",
        tokens,
    )


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration and measure its training step (runs in a fresh process)."""
    device = torch.device(config["device"])
    torch.manual_seed(0)
    model = build_model(config).to(device)
    size, batch = config["size"], config["batch"]
    x = torch.randn(batch, config["channels"], size, size, size, device=device)
    features = torch.randn(batch, config["emb_dim"], device=device)

    def step() -> None:
        model(x, features).square().mean().backward()

    result = measure_training_step(
        model, step, device, warmup=config["warmup"], repeats=config["repeats"], count_flops=config["count_flops"]
    )
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option}: expected positive integers, got {text!r}")
    return values


def _names(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ConfigError(f"{option}: expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m benchmarks.attention``."""
    parser.add_argument("--sizes", default="8,16,32,64", help="cube edges, channel variant (default 8,16,32,64)")
    parser.add_argument("--spatial-sizes", default="8,16", help="cube edges, spatial variant (default 8,16)")
    parser.add_argument("--channels", default="32", help="comma-separated channel counts, e.g. 16,32,64 (default 32)")
    parser.add_argument("--variants", default="channel,spatial", help="channel and/or spatial (default both)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)} (default all)")
    parser.add_argument("--heads", type=int, default=1, help="attention heads (default 1)")
    parser.add_argument("--depth", type=int, default=4, help="stacked attention layers (default 4)")
    parser.add_argument("--emb-dim", type=int, default=64, help="conditioning vector size (default 64)")
    parser.add_argument(
        "--monai-max-tokens", type=int, default=4096, help="largest D*H*W for the MONAI block (default 4096)"
    )
    add_step_arguments(parser)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of step time and memory per size")
    add_common_arguments(parser, timeout_s=600.0)


def _configs(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    check_counts(args, ("heads", "depth", "emb_dim", "batch", "repeats", "monai_max_tokens"))
    channels = _int_list(args.channels, "--channels")
    if any(c % args.heads for c in channels):
        raise ConfigError(f"--channels: every count must be divisible by --heads {args.heads}, got {args.channels}")
    variants = _names(args.variants, "--variants", VARIANTS)
    modes = _names(args.modes, "--modes", MODES)
    sizes = {
        "channel": parse_sizes(args.sizes, "--sizes", 1),
        "spatial": parse_sizes(args.spatial_sizes, "--spatial-sizes", 1),
    }
    common = {
        "bench": "attention",
        "heads": args.heads,
        "depth": args.depth,
        "emb_dim": args.emb_dim,
        **step_config(args, device),
    }
    configs = []
    for variant in variants:
        for size in sizes[variant]:
            for c in channels:
                for mode in ("memory_efficient", "plain"):
                    if mode in modes:
                        configs.append(
                            {
                                **common,
                                "module": "InvertibleAttention3d",
                                "variant": variant,
                                "mode": mode,
                                "size": size,
                                "channels": c,
                            }
                        )
    if "monai" in modes:  # full voxel attention: one row per (size, channels), wherever it fits
        monai_sizes = sorted({s for v in variants for s in sizes[v] if s**3 <= args.monai_max_tokens})
        for size in monai_sizes:
            for c in channels:
                configs.append(
                    {
                        **common,
                        "module": MODULE_NAMES["monai"],
                        "variant": "spatial",
                        "mode": "monai",
                        "size": size,
                        "channels": c,
                    }
                )
    return configs


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    plain = {(r["variant"], r["size"], r["channels"]): r for r in rows if r["mode"] == "plain"}
    for r in rows:
        ref = plain.get((r["variant"], r["size"], r["channels"]), {})
        r["time_ratio_vs_plain"] = ratio(r.get("step_s"), ref.get("step_s"))
        r["growth_ratio_vs_plain"] = ratio(r.get("peak_growth_mib"), ref.get("peak_growth_mib"))
        if isinstance(r.get("flops"), (int, float)):
            r["gflops"] = r["flops"] / 1e9


COLUMNS = (
    Column("module", "module"),
    Column("variant", "variant"),
    Column("mode", "mode"),
    Column("size", "size"),
    Column("channels", "C"),
    *step_columns(".4f", ".2f"),
    Column("growth_ratio_vs_plain", "growth / plain", ".2f"),
    Column("time_ratio_vs_plain", "time / plain", ".2f"),
)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m benchmarks.attention``; prints markdown (or JSON lines with ``--json``)."""
    device = resolve_device(args.device)
    configs = _configs(args, device)
    info = machine_info(device)
    rows: list[dict[str, Any]] = []
    for config in configs:
        progress(
            f"bench attention: {config['variant']} {config['mode']}, C={config['channels']}, {config['size']}^3 ..."
        )
        rows.append(run_config("benchmarks.attention:child", config, timeout_s=args.timeout))
    _add_ratios(rows)
    title = (
        f"## python -m benchmarks.attention: {args.depth} layers, {args.heads} head(s), batch {args.batch}, "
        "one training step (forward + backward)"
    )
    notes = [
        f"- {r['variant']} {r['mode']} {r['size']}^3 C={r['channels']}: {r.get('status')}: {r.get('error')}"
        for r in rows
        if r.get("status") != "ok"
    ]
    status = report(rows, args, info, COLUMNS, [title], notes)
    if args.plot is not None:
        progress(f"bench attention: wrote {_plot(rows, args.plot)}")
    return status


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Step time and peak memory growth against voxels, one line per (variant, mode, channels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            series.setdefault(f"{r['variant']} {r['mode']} C={r['channels']}", []).append(r)
    for label, points in sorted(series.items()):
        points.sort(key=lambda r: r["size"])
        style = {"memory_efficient": "-o", "plain": "--s", "monai": ":^"}[points[0]["mode"]]
        for ax, key in zip(axes, ("step_s", "peak_growth_mib")):
            ax.plot([p["size"] ** 3 for p in points], [max(p[key] or 0.0, 1e-3) for p in points], style, label=label)
    for ax, ylabel in zip(axes, ("step time (s)", "peak memory growth (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("voxels (D*H*W)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("InvertibleAttention3d vs MONAI SpatialAttentionBlock: one training step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m benchmarks.attention``)."""
    from benchmarks import main as lab

    return lab(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
