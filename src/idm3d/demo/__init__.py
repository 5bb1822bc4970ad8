"""``idm3d demo``: a T1 -> T2 translation demo on the MNI template, IDMUNet vs MONAI vs a linear map.

``run_demo(out, minutes=...)`` trains, samples, scores and writes ``report.md`` / ``report.json``; see
:mod:`idm3d.demo.pipeline`. Names are imported lazily so ``idm3d --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pipeline": ("run_demo", "demo_config", "baseline_config", "find_demo_config"),
    "reference": ("LinearMap", "fit_linear_map"),
    "report": ("build_report", "report_markdown", "write_report"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'idm3d.demo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"idm3d.demo.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
