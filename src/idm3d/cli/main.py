"""``idm3d`` command line: one sub-command module per verb, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from idm3d.allocator import configure_from_env
from idm3d.errors import IDM3DError

# Each name is a module ``idm3d.cli.<name>`` exposing ``register(subparsers)``; the registered
# parser sets ``func(args) -> int | None``.
SUBCOMMAND_MODULES: tuple[str, ...] = ("data", "train", "sample", "evaluate", "detect", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idm3d",
        description="3D diffusion models on medical volumes with a memory-saving invertible denoiser.",
        epilog="Environment: IDM3D_MALLOC=tuned fixes glibc's mmap/trim thresholds so freed tensors return to the "
        "system (lower RSS, more CPU per step) and backs large tensors with huge pages (THP_MEM_ALLOC_ENABLE=1 "
        "unless set); default system. See idm3d.allocator.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"idm3d.cli.{name}").register(sub)
    return parser


def _say(line: str) -> None:
    # One write, newline included: processes sharing a pipe (torchrun's ranks) then never split a line.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    # Only a real command line (not an in-process call with argv) tunes the process's allocator.
    from_command_line = argv is None
    if from_command_line:
        try:
            # IDM3D_MALLOC=tuned: RSS near the live tensors; before any sub-command imports torch,
            # which reads its huge-page switch once
            configure_from_env()
        except IDM3DError as err:
            _say(f"idm3d: error: {err}")
            return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (IDM3DError, FileNotFoundError) as err:
        if args.debug:
            traceback.print_exc()
        _say(f"idm3d: error: {err}")
        return 2
    except KeyboardInterrupt:
        _say("idm3d: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
