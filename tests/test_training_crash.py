"""Crash safety: ``idm3d train`` killed with SIGKILL (inside checkpoint writes and at random times) resumes
from its last complete checkpoint, never leaves a corrupt checkpoint, and sees the same data from there on:
its losses and final weights equal those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import t1_to_t2, tiny_run_config, write_brats_folder
from idm3d.runs.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from idm3d.runs.logs import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")]

MAX_STEPS = 12
TIMEOUT = 90.0


def _config(root: Path) -> dict:
    return tiny_run_config(t1_to_t2(root), {"max_steps": MAX_STEPS, "keep_checkpoints": 2, "seed": 11, "lr": 1e-3})


class Training:
    """``python -m idm3d train`` in a subprocess (one thread, so results are bit-reproducible)."""

    def __init__(self, cfg: Path, run: Path, resume: bool, pause: float = 0.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "IDM3D_CHECKPOINT_WRITE_PAUSE": str(pause), "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        self.err_path = run.parent / f"{run.name}-{time.monotonic_ns()}.err"
        cmd = [sys.executable, "-m", "idm3d", "train", "--config", str(cfg), "--out", str(run)]
        self.proc = subprocess.Popen([*cmd, "--resume"] if resume else cmd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.err_path, "w"))  # noqa: SIM115
        self.run = run

    def wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited ({self.proc.returncode}) before {what}: {self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.005)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT)

    def stderr(self) -> str:
        return self.err_path.read_text()


def _temp_files(run: Path, kind: str) -> list[str]:
    folder = run / "checkpoints"
    return [p.name for p in folder.iterdir() if f".{kind}.tmp-" in p.name] if folder.is_dir() else []


def _committed_ok(run: Path) -> int:
    """Every committed checkpoint verifies (hash, format); return the newest step (0 if none)."""
    found = list_checkpoints(run / "checkpoints")
    for _, meta in found:
        tensors, _ = load_checkpoint(meta)
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    return found[-1][0] if found else 0


def _resumed_at(proc: Training) -> int:
    proc.wait_for(lambda: "resuming from" in proc.stderr(), "the resume message")
    return int(re.search(r"resuming from step-\d+\.json at step (\d+)", proc.stderr()).group(1))


def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(root)))
    reference, run = tmp_path / "reference", tmp_path / "run"
    ref = Training(cfg, reference, resume=False)

    # 1. Killed while the weights of a checkpoint sit in their temporary file.
    first = Training(cfg, run, resume=False, pause=1.0)
    first.wait_for(lambda: _temp_files(run, "safetensors") and _committed_ok(run) >= 2, "a weights temp file")
    first.kill()
    assert _temp_files(run, "safetensors")
    before = _committed_ok(run)
    assert before >= 2

    # 2. Resumed, then killed while a checkpoint's JSON (its commit record) is being written.
    second = Training(cfg, run, resume=True, pause=1.0)
    assert _resumed_at(second) == before
    second.wait_for(lambda: any(int(n[6:14]) > before for n in _temp_files(run, "json")), "a JSON temp file")
    second.kill()
    orphan_steps = {int(n[6:14]) for n in _temp_files(run, "json")}
    before = _committed_ok(run)
    assert before not in orphan_steps  # the checkpoint whose JSON was torn does not count

    # 3. Resumed, then killed at a random moment.
    third = Training(cfg, run, resume=True)
    assert _resumed_at(third) == before
    time.sleep(random.Random(0).uniform(0.2, 1.5))
    if third.proc.poll() is None:
        third.kill()
    before = _committed_ok(run)

    # 4. Resumed to the end.
    last = Training(cfg, run, resume=True)
    assert _resumed_at(last) == before
    assert last.proc.wait(timeout=TIMEOUT) == 0, last.stderr()
    assert ref.proc.wait(timeout=TIMEOUT) == 0, ref.stderr()

    assert _committed_ok(run) == MAX_STEPS
    assert not _temp_files(run, "safetensors")
    assert not _temp_files(run, "json")
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(reference / "metrics.jsonl")}
    assert {r["step"]: r["loss"] for r in records} == ref_losses
    a = load_file(str(latest_checkpoint(run / "checkpoints").with_suffix(".safetensors")))
    b = load_file(str(latest_checkpoint(reference / "checkpoints").with_suffix(".safetensors")))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(latest_checkpoint(run / "checkpoints").read_text())["step"] == MAX_STEPS
