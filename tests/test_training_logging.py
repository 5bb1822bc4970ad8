"""TensorBoard logging of ``idm3d train`` (event files in the run folder, the tags, previews, resume, the
package missing) and the time-budget fields of the progress bar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import tiny_run_config, write_brats_folder
from idm3d.cli.main import main
from idm3d.errors import ConfigError
from idm3d.runs import tensorboard as tb
from idm3d.runs.rundir import RunDir
from idm3d.training.progress import budget_postfix, format_seconds

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _config(root: Path, **train) -> dict:
    data = {"root": str(root), "task": "translate", "sources": ["t1"], "targets": ["t2"]}
    return tiny_run_config(data, {"max_steps": 4, "drift_check_every": 2, "log": {"preview_steps": 2}, **train})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_brats_folder(tmp_path_factory.mktemp("tb") / "data", n_cases=3, shape=(24, 24, 24),
                              modalities=("t1", "t2"))


def _train(root: Path, out: Path, *args: str, **train) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(_config(root, **train)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["train", "--config", str(cfg), "--out", str(out), *args]) == 0
    finally:
        torch.set_num_threads(threads)


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def logged_run(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tbrun") / "runs" / "t1t2"
    _train(data_root, out)
    return out


def test_event_file_holds_the_training_tags(logged_run: Path):
    files = RunDir(logged_run).tensorboard_files()
    assert len(files) == 1
    assert files[0].parent == logged_run
    acc = _events(logged_run)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/step_time_s", "perf/steps_per_s",
            "perf/memory_mib", "drift/max_error"} <= tags
    assert any(t.startswith("drift/") and t != "drift/max_error" for t in tags)  # each op's error
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    records = {r["step"]: r["loss"] for r in RunDir(logged_run).read_metrics()}
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [records[s] for s in sorted(losses)], rtol=1e-6)
    assert [e.step for e in acc.Scalars("drift/max_error")] == [1, 2, 4]  # the first step, then every 2
    assert all(e.value > 0 for e in acc.Scalars("perf/step_time_s"))


def test_previews_are_logged_at_each_checkpoint(logged_run: Path):
    acc = _events(logged_run)
    assert set(acc.Tags()["images"]) == {"preview/source_t1", "preview/target_t2", "preview/sample_t2"}
    images = acc.Images("preview/sample_t2")
    assert [e.step for e in images] == [2, 4]
    # three 16x16 mid-slices side by side, one padding column each
    assert (images[0].height, images[0].width) == (16, 51)


def test_tensorboard_found_from_the_runs_folder(logged_run: Path):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(logged_run.parent))  # what `tensorboard --logdir runs/` does
    mux.Reload()
    assert list(mux.Runs()) == ["t1t2"]


def test_resume_purges_the_interrupted_tail(logged_run: Path, data_root: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(logged_run, copy)
    for p in (copy / "checkpoints").glob("step-00000004.*"):
        p.unlink()  # as if the run died after step 4's metrics, before its checkpoint
    assert main(["train", "--out", str(copy), "--resume", "--set", "train.max_steps=5"]) == 0
    acc = _events(copy)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_tensorboard_off_by_config_writes_no_events(data_root: Path, tmp_path: Path):
    out = tmp_path / "off"
    _train(data_root, out, max_steps=2, log={"tensorboard": False})
    assert RunDir(out).tensorboard_files() == []
    assert len(RunDir(out).read_metrics()) == 2


def test_training_without_the_package_says_so_once(data_root: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(tb, "tensorboard_available", lambda: False)
    out = tmp_path / "nopkg"
    _train(data_root, out, max_steps=2)
    assert RunDir(out).tensorboard_files() == []
    notes = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert notes == ["idm3d: TensorBoard logging off (the package is not installed; pip install tensorboard "
                     "(or idm3d[tensorboard]))"]
    with pytest.raises(ConfigError, match=r"^train\.log\.tensorboard: true, but the tensorboard package"):
        tb.tensorboard_wanted(True)


def test_bad_log_option_names_the_key(tmp_path: Path, capsys):
    assert main(["train", "--set", "train.log.preview_steps=0", "--out", str(tmp_path / "x")]) == 2
    assert "train.log.preview_steps: expected an integer >= 1" in capsys.readouterr().err


def test_mid_slice_image_orientation_and_range():
    vol = torch.full((4, 6, 8), -1.0)
    vol[:, :, -1] = 1.0  # the top (superior) axial plane
    img = tb.mid_slice_image(vol)
    assert img.shape == (8, 6 + 1 + 4 + 1 + 4 + 1)
    assert img.min() == 0.0
    assert img.max() == 1.0
    assert img[0, 0] == 1.0
    assert img[-1, 0] == 0.0


def test_mid_slice_image_of_a_diverged_sample_is_finite():
    vol = torch.zeros(4, 4, 4)
    vol[2] = float("nan")
    vol[0] = float("inf")
    img = tb.mid_slice_image(vol)
    assert np.isfinite(img).all()
    assert img.min() >= 0.0
    assert img.max() <= 1.0


@pytest.mark.parametrize(
    ("elapsed", "budget", "step", "max_steps", "rate", "expected"),
    [
        (90.0, None, 10, 100, 1.0, {}),
        (90.0, 600.0, 10, None, 1.0, {"time": "1:30/10:00", "eta": "8:30"}),
        (90.0, 600.0, 10, 100, 1.0, {"time": "1:30/10:00", "eta": "1:30"}),  # the steps end first
        (90.0, 600.0, 10, 10_000, 1.0, {"time": "1:30/10:00", "eta": "8:30"}),  # the clock ends first
        (0.0, 7200.0, 0, 100, 0.0, {"time": "0:00/2:00:00", "eta": "2:00:00"}),  # no rate yet
        (700.0, 600.0, 10, None, 1.0, {"time": "11:40/10:00", "eta": "0:00"}),
    ],
)
def test_budget_postfix(elapsed, budget, step, max_steps, rate, expected):
    assert budget_postfix(elapsed, budget, step, max_steps, rate) == expected


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3600, 3725)] == ["0:00", "0:59", "1:01", "1:00:00", "1:02:05"]


def test_progress_bar_shows_the_time_budget(data_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "timed"
    _train(data_root, out, max_steps=3, max_seconds=3600.0, progress=True, log={"tensorboard": False})
    err = capsys.readouterr().err
    assert "time=" in err
    assert "/1:00:00" in err
    assert "eta=" in err
    assert json.loads((out / "checkpoints" / "step-00000003.json").read_text())["step"] == 3


def test_a_failing_preview_warns_and_training_goes_on(data_root: Path, tmp_path: Path, monkeypatch, capsys):
    from idm3d.training import trainer

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trainer, "preview_volumes", out_of_memory)
    out = tmp_path / "oom"
    _train(data_root, out, max_steps=2)
    err = capsys.readouterr().err
    assert "idm3d: warning: step 2: TensorBoard preview skipped (CUDA out of memory (simulated))" in err
    assert [e.step for e in _events(out).Scalars("train/loss")] == [1, 2]
