"""``idm3d bench``: benchmarks that print markdown tables (or JSON lines), one sub-command each."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from idm3d.errors import ConfigError

__all__ = ["BENCHMARKS", "register"]

# (sub-command, module exposing add_arguments(parser) and run(args) -> int, help)
BENCHMARKS: tuple[tuple[str, str, str], ...] = (
    ("memory", "idm3d.bench.memory", "IDMUNet vs MONAI (plain, checkpointed) and PatchDDM-3D: memory, time, FLOPs"),
    ("profile", "idm3d.bench.profile", "per module of one training step: bytes saved for backward, peak memory"),
    ("max-size", "idm3d.bench.max_size", "largest trainable cube per network within a memory budget"),
)


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise ConfigError(f"bench {name}: not available in this installation ({reason})")

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (markdown or JSON output)",
        description="Benchmarks. Each configuration runs in a fresh process; results print as a markdown "
        "table, or one JSON object per configuration with --json. The machine is named in both.",
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name, help_text in BENCHMARKS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # One missing benchmark module must not take the other benchmarks (or the CLI) down.
            if err.name != module_name:
                raise
            p = sub.add_parser(name, help=f"{help_text} (unavailable)")
            p.set_defaults(func=_unavailable(name, f"no module {module_name}"))
            continue
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(p)
        p.set_defaults(func=module.run)
