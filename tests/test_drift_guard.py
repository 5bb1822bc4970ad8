"""Drift guard: with ``train.drift_check_every=N`` a memory-efficient IDMUNet run logs, every N steps, the max
abs error with which each invertible core op's input is rebuilt from its output, and warns or stops
(exit 2, one line naming the op and the error) above ``train.drift_threshold``."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from helpers import write_brats_folder
from idm3d.cli.main import main
from idm3d.errors import IDM3DError
from idm3d.runs.checkpoint import list_checkpoints
from idm3d.runs.config import ModelConfig, config_from_dict
from idm3d.runs.logs import read_metrics
from idm3d.runs.model_factory import build_model
from idm3d.training.trainer import Trainer

KWARGS = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, False],
          "memory_efficient": True}
WARNING = re.compile(r"idm3d: warning: reconstruction drift at step (\d+): segment (\S+) rebuilds its input with "
                     r"max abs error (\S+) > train\.drift_threshold 1e-30")


def config(root: Path, **train) -> dict:
    return {
        "data": {"root": str(root), "task": "translate", "sources": ["t1"], "targets": ["t2"],
                 "patch_size": [8, 8, 8], "test_fraction": 0.34},
        "model": {"name": "idm", "kwargs": dict(KWARGS)},
        "diffusion": {"num_train_timesteps": 50},
        "train": {"max_steps": 4, "checkpoint_every": 100, "log_every": 100, "progress": False, "lr": 1e-3,
                  "drift_check_every": 2, **train},
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_brats_folder(tmp_path_factory.mktemp("drift"), n_cases=3, shape=(16, 16, 16), modalities=("t1", "t2"))


@pytest.fixture(scope="module")
def op_names() -> list[str]:
    return list(build_model(ModelConfig("idm", dict(KWARGS)), 2, 1).op_names)


def train(capsys, tmp_path: Path, root: Path, *argv: str, **train_options) -> tuple[int, list[str], Path]:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config(root, **train_options)))
    run = tmp_path / "run"
    capsys.readouterr()
    rc = main(["train", "--config", str(cfg), "--out", str(run), *argv])
    return rc, capsys.readouterr().err.strip().splitlines(), run


def drift_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "drift" in r]


def check_record(record: dict, op_names: list[str]) -> None:
    drift = record["drift"]
    assert list(drift) == op_names
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in drift.values())
    assert record["drift_max"] == max(drift.values())
    assert drift[record["drift_op"]] == record["drift_max"]


def test_per_op_errors_are_logged_every_n_steps_below_the_default_threshold(data_dir, tmp_path, capsys, op_names):
    rc, err, run = train(capsys, tmp_path, data_dir, "--set", "train.max_steps=5")
    assert rc == 0
    assert err == []  # 1e-3 default: exact float32 inverses stay far below it
    records = drift_records(run)
    # the first step of the run, then every N; logged although train.log_every=100
    assert [r["step"] for r in records] == [1, 2, 4]
    for record in records:
        check_record(record, op_names)
        assert 0 < record["drift_max"] < 1e-4  # rounding only, and really measured
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 4, 5]


def test_no_drift_fields_without_the_check(data_dir, tmp_path, capsys):
    rc, _, run = train(capsys, tmp_path, data_dir, drift_check_every=0, log_every=1)
    assert rc == 0
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert not any(k.startswith("drift") for r in records for k in r)


def test_warn_logs_a_warning_and_training_goes_on(data_dir, tmp_path, capsys, op_names):
    rc, err, run = train(capsys, tmp_path, data_dir, drift_threshold=1e-30, drift_action="warn")
    assert rc == 0
    records = drift_records(run)
    assert len(err) == len(records) == 3
    for line, record in zip(err, records):
        step, op, error = WARNING.fullmatch(line).groups()
        check_record(record, op_names)
        assert int(step) == record["step"]
        assert op == record["drift_op"]
        assert error == f"{record['drift_max']:.3g}"
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4]


def test_stop_exits_2_with_one_line_naming_the_op_and_the_error(data_dir, tmp_path, capsys, op_names):
    # One clean step (checked at step 1 with the default threshold), then a resumed run that drifts.
    rc, _, run = train(capsys, tmp_path, data_dir, "--set", "train.max_steps=1", checkpoint_every=1)
    assert rc == 0
    capsys.readouterr()
    rc = main(["train", "--out", str(run), "--resume", "--set", "train.max_steps=4",
               "--set", "train.drift_threshold=1e-30", "--set", "train.drift_action=stop"])
    err = capsys.readouterr().err.strip().splitlines()[1:]  # after the "resuming from" line
    assert rc == 2
    assert len(err) == 1
    # the first step of the resumed run is checked
    assert err[0].startswith("idm3d: error: reconstruction drift at step 2: ")
    step, op, error = WARNING.fullmatch(err[0].replace("idm3d: error:", "idm3d: warning:")).groups()
    record = read_metrics(run / "metrics.jsonl")[-1]
    assert record["drift_stop"] is True
    check_record(record, op_names)
    assert (int(step), op, error) == (2, record["drift_op"], f"{record['drift_max']:.3g}")
    # The drifting step is not saved; the run resumes from its last checkpoint once the guard is relaxed.
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1]
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--set", "train.drift_action=warn"]) == 0
    assert "resuming from step-00000001.json at step 1" in capsys.readouterr().err
    assert [r["step"] for r in drift_records(run)] == [1, 2, 4]  # the log is cut back to the checkpoint
    assert not any(r.get("drift_stop") for r in read_metrics(run / "metrics.jsonl"))


def test_a_nan_rebuild_error_counts_as_drift(data_dir, tmp_path, op_names):
    cfg = config_from_dict(config(data_dir, drift_action="stop", drift_check_every=1))
    trainer = Trainer(cfg, tmp_path / "run")
    real = trainer.model.reconstruction_error
    trainer.model.reconstruction_error = lambda x, t, c=None: {**real(x, t, c), op_names[-1]: float("nan")}
    with pytest.raises(IDM3DError, match=rf"step 1: segment {re.escape(op_names[-1])} .* error nan > "):
        trainer.run()
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["drift_op"] == op_names[-1]
    assert record["drift"][op_names[-1]] is None  # JSON has no NaN
    assert record["drift_max"] is None
