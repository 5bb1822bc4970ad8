"""Inference on a trained run: ``sample`` (NIfTI in, NIfTI out), batch sampling, ``evaluate``.

Built on :func:`idm3d.runs.load.load_run`; names are imported lazily.
"""

from __future__ import annotations

from idm3d.lazy import lazy_exports

_EXPORTS = {
    "generate": ("sample", "write_sample"),
    "batch": ("sample_folder", "sample_many"),
    "domain_sample": ("shard_run", "write_sample_sharded"),
    "evaluation": ("evaluate", "train_baseline"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

