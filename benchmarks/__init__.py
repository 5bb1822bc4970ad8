"""The lab: studies, probes and table generators that reproduce every figure under docs/, run from a checkout.

Each study is a module run from the repository root, ``python -m benchmarks.<name> --help``; the wheel
(``src/idm3d``) holds only what users run (``idm3d bench memory|max-size|profile`` among it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from idm3d.errors import IDM3DError

__all__ = ["main"]


def main(study: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with a study module's ``add_arguments``, call its ``run``; a user's fault is one line, exit 2."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {study.__name__}" if study.__name__ != "__main__" else None,
        description=(study.__doc__ or "").strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    study.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(study.run(args) or 0)
    except IDM3DError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
