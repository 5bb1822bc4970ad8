"""A run: its config, its folder, its checkpoints, and loading it back (``load_run``).

Everything that reads or writes a run folder lives here; the training loop (:mod:`idm3d.training`) and
inference (:mod:`idm3d.inference`) sit on top. Names are imported lazily, so reading a config does not
import the data layer or the networks.
"""

from __future__ import annotations

from idm3d.lazy import lazy_exports

_EXPORTS = {
    "config": ("Config", "load_config", "config_from_dict", "config_to_dict", "save_config"),
    "load": ("load_run", "LoadedRun", "build_pipeline"),
    "rundir": ("RunDir",),
    "data_source": ("DataSource", "DemoSource", "FolderSource", "data_source"),
    "model_factory": ("build_model",),
    "checkpoint": ("TrainState", "load_checkpoint", "save_checkpoint", "latest_checkpoint"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

