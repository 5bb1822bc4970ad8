"""Faults under DDP (torchrun, 2 gloo processes), one after the other in one job: a process SIGKILLed under
``torchrun --max-restarts`` is restarted from the last checkpoint; a stop signal to one process checkpoints
the agreed step; ``--resume auto`` then ends bit-identical to an uninterrupted run.

The lost work (steps recomputed) of each fault is printed (``pytest -s``) for docs/failure-modes.md."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_run_config, torchrun_command, write_brats_folder
from idm3d.runs.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from idm3d.runs.logs import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")]

MAX_STEPS = 6
TIMEOUT = 240.0
SRC = str(Path(__file__).parents[1] / "src")


class Job:
    """``torchrun --standalone --nproc_per_node 2 [--max-restarts N] -m idm3d train ... --resume auto``.

    ``entry`` replaces ``-m idm3d`` (a worker script such as ``tests/ddp_fault_worker.py``); ``env`` adds variables.
    """

    def __init__(self, cfg: Path, run: Path, *extra: str, restarts: int = 0, entry: tuple[str, ...] = ("-m", "idm3d"),
                 env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {}),
               "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
        self.err = run.parent / f"{run.name}-{time.monotonic_ns()}.err"
        cmd = [*torchrun_command(), "--standalone", "--nproc_per_node", "2", "--max-restarts", str(restarts),
               *entry, "train", "--config", str(cfg), "--out", str(run), "--resume", "auto", *extra]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.err, "w"))  # noqa: SIM115
        self.run = run

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self) -> int:
        return self.proc.wait(timeout=TIMEOUT)

    def logged_step(self) -> int:
        return max((r["step"] for r in read_metrics(self.run / "metrics.jsonl") if "loss" in r), default=0)

    def wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"torchrun exited ({self.proc.returncode}) before {what}: {self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def worker(self, rank: int) -> int:
        """The pid of the training process of ``rank`` (a child of torchrun with RANK=rank)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and f"RANK={rank}".encode() in env:
                return int(entry.name)
        raise AssertionError(f"no worker of rank {rank}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config and an uninterrupted run of it (started here, waited for by the tests)."""
    tmp = tmp_path_factory.mktemp("ddp-faults")
    root = write_brats_folder(tmp / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1",))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config(
        {"root": str(root), "batch_size": 2},
        {"max_steps": MAX_STEPS, "checkpoint_every": 2, "keep_checkpoints": 2, "seed": 3, "lr": 1e-3,
         "device": "cpu"})))
    return cfg, Job(cfg, tmp / "reference")


def _final(run: Path) -> dict[str, torch.Tensor]:
    path = latest_checkpoint(run / "checkpoints")
    assert path is not None
    assert path.name == f"step-{MAX_STEPS:08d}.json"
    return load_checkpoint(path)[0]


def _same_as_reference(run: Path, reference: Job) -> None:
    assert reference.wait() == 0, reference.stderr()[-3000:]
    a, b = _final(run), _final(reference.run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_restart_then_sigterm_stop_then_resume_auto_end_bit_identical(setup, tmp_path):
    cfg, reference = setup
    run = tmp_path / "run"
    job = Job(cfg, run, restarts=1)
    # 1. Rank 1 SIGKILLed between two checkpoints (steps to recompute): torchrun restarts both processes
    #    with the same command, and --resume auto continues from the last checkpoint.
    job.wait_for(lambda: list_checkpoints(run / "checkpoints") and job.logged_step() % 2 == 1, "an odd step")
    killed_after, dead = job.logged_step(), job.worker(1)
    os.kill(dead, signal.SIGKILL)
    job.wait_for(lambda: "resuming from" in job.stderr(), "the restart")
    resumed = int(re.search(r"resuming from step-\d+\.json at step (\d+)", job.stderr()).group(1))
    assert resumed <= killed_after
    print(f"\nSIGKILL after step {killed_after} (at least): resumed at {resumed}, "
          f"lost work {killed_after - resumed}+ steps")
    # 2. SIGTERM to rank 1 only: rank 0 learns it from the per-step all-reduce; both stop after the same
    #    step, rank 0 checkpoints it, both exit 75 (no restart left: torchrun reports the failure).
    job.wait_for(lambda: job.logged_step() > resumed, "a step after the restart")
    os.kill(job.worker(1), signal.SIGTERM)
    assert job.wait() != 0
    assert "exitcode  : 75" in job.stderr()
    stop = int(re.search(r"stopped by another process.s signal after step (\d+)", job.stderr()).group(1))
    assert stop == job.logged_step() < MAX_STEPS
    assert latest_checkpoint(run / "checkpoints").name == f"step-{stop:08d}.json"  # nothing lost
    print(f"SIGTERM: checkpoint at step {stop}, lost work 0 steps")
    # 3. The job rerun with the same command ends where an uninterrupted run ends.
    again = Job(cfg, run)
    assert again.wait() == 0, again.stderr()[-3000:]
    assert f"resuming from step-{stop:08d}.json at step {stop}" in again.stderr()
    _same_as_reference(run, reference)
