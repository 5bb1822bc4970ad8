"""Under DDP (torchrun, 2 gloo processes) a checkpoint write that fails on rank 0 (disk full there) stops every
process with rank 0's one line, at once: no process is left training or waiting in a collective."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_run_config, write_brats_folder
from idm3d.runs.checkpoint import list_checkpoints, load_checkpoint
from test_training_faults_ddp import Job

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")

WORKER = str(Path(__file__).with_name("ddp_fault_worker.py"))


def test_a_failed_checkpoint_write_on_rank_0_stops_every_rank_with_its_line(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=2, shape=(24, 24, 24), modalities=("t1",))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config(
        {"root": str(root), "batch_size": 2, "test_fraction": 0.0},
        {"max_steps": 3, "checkpoint_every": 1, "seed": 3, "device": "cpu", "log": {"tensorboard": False}})))
    run = tmp_path / "run"
    start = time.monotonic()
    # The second checkpoint (step 2): its weights' rename fails with ENOSPC on rank 0 only.
    job = Job(cfg, run, entry=(WORKER,), env={"IDM3D_TEST_FAULT": "0:weights rename:2:ENOSPC"})
    rc = job.proc.wait(timeout=120)
    err = job.stderr()
    print(f"\n{time.monotonic() - start:.1f} s\n{err[-4000:]}")
    assert rc != 0
    # Both processes write to one pipe, so their lines may land on one line: split on the prefix, not on newlines.
    lines = ["idm3d: error: " + part.split("\n")[0] for part in err.split("idm3d: error: ")[1:]]
    assert len(lines) == 2, err[-3000:]  # one per process ...
    assert lines[0] == lines[1]  # ... the same diagnosis
    assert lines[0].startswith(f"idm3d: error: {run}: cannot write checkpoint step-00000002 in checkpoints/ ")
    assert "ENOSPC); " in lines[0]
    assert "last complete checkpoint step-00000001.json is intact" in lines[0]
    # Rank 1 stopped on the agreed line, not on a broken connection when rank 0 left (nor training on).
    assert "Connection closed" not in err
    assert "[rank1]:" not in err
    assert [step for step, _ in list_checkpoints(run / "checkpoints")] == [1]
    load_checkpoint(run / "checkpoints" / "step-00000001.json")
