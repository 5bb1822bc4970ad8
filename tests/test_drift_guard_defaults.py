"""The drift guard's defaults catch a silently wrong batched inverse at the first step.

The fault of pytorch/pytorch#142815 at its quietest: a batched solve that returns plausible values, wrong
for the second sample of a batch of 2. Only the memory-efficient backward calls the inverse, so the loss
stays finite and training goes on; the default drift check (``train.drift_check_every`` etc. left as
they are) must report it after step 1, the errors per op locating the attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import write_brats_folder
from idm3d.cli.main import main
from idm3d.invertible import linalg
from idm3d.runs.config import TrainConfig

KWARGS = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, True],
          "memory_efficient": True}


def _config(root: Path) -> dict:
    # No drift_* key: the defaults are what is tested.
    return {
        "data": {"root": str(root), "targets": ["t1"], "patch_size": [16, 16, 16], "batch_size": 2},
        "model": {"name": "idm", "kwargs": KWARGS},
        "diffusion": {"num_train_timesteps": 50},
        "train": {"max_steps": 2, "log_every": 100, "checkpoint_every": 100, "progress": False},
    }


def test_default_drift_check_runs_at_the_first_step_and_then_periodically():
    defaults = TrainConfig()
    assert defaults.drift_check_every == 100
    assert defaults.drift_threshold == 1e-3


@pytest.mark.parametrize("faulty", [False, True])
def test_default_drift_check_reports_a_silently_wrong_batched_solve(tmp_path: Path, capsys, monkeypatch, faulty):
    true_solve = linalg.solve

    def wrong_for_the_second_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = true_solve(a, b)
        if a.dim() == 4 and a.shape[0] > 1:  # (B, heads, n, n): the attention inverse, not the Cayley maps
            x = x.clone()
            x[1] *= 1.01  # 1% off: finite, plausible, wrong
        return x

    if faulty:
        monkeypatch.setattr(linalg, "solve", wrong_for_the_second_sample)
    root = write_brats_folder(tmp_path / "data", n_cases=2, shape=(24, 24, 24), modalities=("t1",))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(root)))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "drift_max" in r)
    assert first["step"] == 1
    if faulty:
        # Errors chain from the output down: exact after the attention, wrong from it on.
        drift = first["drift"]
        assert drift["bottom1.attention"] > 1e-3
        assert max(drift["up0.upsample"], drift["up0.merge"], drift["up0.coupling0"]) <= 1e-5
        assert first["drift_max"] > 1e-3
        assert "idm3d: warning: reconstruction drift at step 1: segment" in err
    else:
        assert first["drift_max"] <= 1e-5
        assert "reconstruction drift" not in err
