"""``idm3d data check DIR``: list every problem of a data folder, one line each (exit 0 clean, 2 otherwise)."""

from __future__ import annotations

import argparse
import sys

from idm3d.data.cases import check_dataset, detect_layout, parse_modalities, scan_cases
from idm3d.errors import ArgumentError, ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect data folders")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = sub.add_parser(
        "check",
        help="check a data folder (BraTS2020 or generic case folders)",
        description="Print one line per problem (missing/corrupt/non-3D files, NaN/Inf or constant volumes, "
        "missing modalities, mismatched shapes or affines). Exit 0 when clean, 2 otherwise.",
    )
    check.add_argument("dir", metavar="DIR", help="folder of case sub-folders")
    check.add_argument("--modalities", default="t1,t2", help="comma-separated modality names (default: t1,t2)")
    check.add_argument("--quick", action="store_true", help="read headers only (skips voxel checks)")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    try:
        modalities = parse_modalities(args.modalities)
    except ArgumentError as err:
        raise ConfigError(f"{err.argument}: {err.detail}") from None
    problems = check_dataset(args.dir, modalities, deep=not args.quick)
    if problems:
        for line in problems:
            print(line)
        print(f"idm3d: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 2
    cases, _ = scan_cases(args.dir, modalities)
    layout = "BraTS2020" if detect_layout(cases) == "brats2020" else "generic"
    scope = "headers readable, 3D" if args.quick else "readable, 3D, finite, non-constant"
    print(
        f"OK: {len(cases)} case(s) in {args.dir} ({layout} layout), modalities {','.join(modalities)}: "
        f"every file {scope}; one grid per case"
    )
    return 0
