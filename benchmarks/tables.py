"""Regenerate the measurement tables of docs/measurements.md and README's summary from docs/bench/'s JSON.

    PYTHONPATH=src python -m benchmarks.tables            # rewrite the blocks between the markers
    PYTHONPATH=src python -m benchmarks.tables --print    # print them instead

Every table names the command that wrote its JSON (``COMMANDS``, in ``benchmarks.tables_common``); nothing
here is typed in by hand except those command lines and the goals' thresholds (issue 17). The renderers
live in ``tables_memory`` (the measurement tables), ``tables_goals`` and ``tables_summary``; this module
holds which file gets which block (``BLOCKS``) and what goes in it (:func:`rendered`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/tables.py): import the lab from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.tables_common import COMMANDS, MAX_SIZE, ROOT
from benchmarks.tables_goals import goals
from benchmarks.tables_memory import big, flops, inference, malloc, max_size, sampling, training
from benchmarks.tables_summary import summary

__all__ = ["BLOCKS", "COMMANDS", "main", "render", "rendered"]

BEGIN, END = "<!-- bench-tables:begin -->", "<!-- bench-tables:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary:begin -->", "<!-- summary:end -->"
# file -> its marked block; what goes in it: rendered()
BLOCKS: dict[str, tuple[str, str]] = {"docs/measurements.md": (BEGIN, END), "README.md": (SUMMARY_BEGIN, SUMMARY_END)}


def render() -> str:
    parts = [
        goals(),
        training("memory-64.jsonl"),
        training("memory-128.jsonl"),
        flops(),
        malloc(),
        big(),
        *(max_size(name) for name in MAX_SIZE),
        inference(),
        sampling(),
    ]
    return "\n\n".join(p for p in parts if p)


def rendered() -> dict[str, str]:
    """Each file's marked block as it should read."""
    return {"docs/measurements.md": render(), "README.md": summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print instead of rewriting the files")
    args = parser.parse_args(argv)
    for name, text in rendered().items():
        if args.print:
            print(f"## {name}\n\n{text}\n")
            continue
        begin, end = BLOCKS[name]
        path = ROOT / name
        content = path.read_text()
        if begin not in content or end not in content:
            print(f"{name} has no {begin} ... {end} block", file=sys.stderr)
            return 1
        head, rest = content.split(begin, 1)
        _, tail = rest.split(end, 1)
        path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
