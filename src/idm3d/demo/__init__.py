"""``idm3d demo``: a T1 -> T2 translation demo on the MNI template, IDMUNet vs MONAI vs a linear map.

``run_demo(out, minutes=...)`` trains, samples, scores and writes ``report.md`` / ``report.json``; see
:mod:`idm3d.demo.pipeline`. Names are imported lazily so ``idm3d --help`` stays fast.
"""

from __future__ import annotations

from idm3d.lazy import lazy_exports

_EXPORTS = {
    "pipeline": ("run_demo", "demo_config", "baseline_config", "find_demo_config"),
    "reference": ("LinearMap", "fit_linear_map"),
    "report": ("build_report", "report_markdown", "write_report"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

