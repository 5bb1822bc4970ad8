"""A worker group restarted by ``torchrun --max-restarts`` creates its process group afresh: the new
attempt never reads the dead attempt's addresses from torchrun's store (which outlives the attempt)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import torchrun_command

WORKER = str(Path(__file__).with_name("restart_worker.py"))
SRC = str(Path(__file__).parents[1] / "src")


def test_a_restarted_worker_group_meets_again_when_one_process_joins_late():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*torchrun_command(), "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
                           "--tee", "3", WORKER, "3"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attempt 1 rank 0 sum 2" in done.stdout
    assert "attempt 1 rank 1 sum 2" in done.stdout
