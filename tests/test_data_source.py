"""DataSource: training data and held-out cases from the config alone, writing nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import write_brats_folder
from idm3d.errors import ConfigError, DataError
from idm3d.runs.config import config_from_dict
from idm3d.runs.data_source import FolderSource, data_source


def _config(root: Path, **data):
    return config_from_dict({
        "data": {"root": str(root), "task": "translate", "sources": ["t1"], "targets": ["t2"],
                 "patch_size": [8, 8, 8], "test_fraction": 0.34, **data},
        "model": {"name": "idm", "kwargs": {"channels": 8, "levels": 2, "attention_levels": [False, False]}},
        "train": {"max_steps": 1, "device": "cpu"},
    })


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_folder_source_splits_the_same_way_every_time_and_writes_nothing(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=3, modalities=("t1", "t2"))
    before = _snapshot(tmp_path)
    source = data_source(_config(root))
    assert isinstance(source, FolderSource)
    first, second = source.prepare(), source.prepare()  # e.g. two DDP processes
    assert first.split == second.split
    assert len(first.split.test) == 1
    assert set(first.info["scalings"]) == {"t1", "t2"}
    target, src = first.data.batch(0)
    assert (target.shape[1], src.shape[1]) == (1, 1)
    held = list(source.heldout(first.split, "test"))
    assert [c.case_id for c in held] == list(first.split.test)
    assert _snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["data"]
    # A resumed run keeps its saved split even when the seed would now draw another.
    moved = data_source(_config(root, split_seed=99)).prepare(first.split)
    assert moved.split == first.split


def test_sampler_errors_name_the_config_key(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=3, modalities=("t1", "t2"))
    with pytest.raises(ConfigError, match=r"^data\.patch_size: 512 voxels along axis 0"):
        data_source(_config(root, patch_size=[512, 8, 8])).prepare()


def test_preprocessing_errors_name_the_config_key(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=3, modalities=("t1", "t2", "seg"))
    with pytest.raises(ConfigError, match=r"^data\.sources/data\.targets: \['seg'\] are label maps"):
        data_source(_config(root, targets=["seg"])).prepare()


def test_too_few_cases_for_the_split_is_one_line_naming_the_folder_and_the_fractions(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=2, modalities=("t1", "t2"))
    with pytest.raises(DataError, match=r"^data\.root .*: 2 cases cannot give a non-empty train set .*test_fraction"):
        data_source(_config(root, val_fraction=0.4, test_fraction=0.5)).prepare()


def test_the_demo_around_split_draws_patches_below_and_above_the_held_out_band():
    cfg = config_from_dict({
        "data": {"task": "translate", "sources": ["t1"], "targets": ["t2"], "patch_size": [32, 32, 16],
                 "demo_split": "around"},
        "model": {"name": "idm", "kwargs": {"channels": 8, "levels": 2, "attention_levels": [False, False]}},
        "train": {"max_steps": 1, "device": "cpu"},
    })
    source = data_source(cfg)
    demo, sampler = source.demo, source.prepare().data.sampler
    band = demo.test_slices
    z = [int(sampler.batch(step)["corner"][0, 2]) for step in range(64)]
    below = [c for c in z if c + 16 <= demo.train_slices.stop]
    above = [c for c in z if c >= demo.above_slices.start]
    assert len(below) + len(above) == len(z)  # no patch touches the band or its gaps
    assert below
    assert above
    assert all(c + 16 <= band.start or c >= band.stop for c in z)
    held = next(iter(source.heldout()))
    assert held.position[0].tolist() == [0, 0, band.start]  # the band keeps its place (inside the trained z range)


def test_the_demo_split_is_refused_for_a_folder(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=3, modalities=("t1", "t2"))
    with pytest.raises(ConfigError, match=r"^data\.demo_split: only for the demo data"):
        _config(root, demo_split="around")
