"""``python -m benchmarks.patch_study`` / ``bench sampling``: the study's configurations, its goal verdicts on known
measurements, the written report, option errors, and whole-volume sampling measured end to end (16^3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from benchmarks import main as lab
from benchmarks import patch_study, sampling
from benchmarks.patch_report import judge, summarise, write_report
from benchmarks.patch_study import CONFIGS, study_config, train_child

from helpers import TINY_IDM
from idm3d.runs.config import load_config


def test_the_four_configurations_on_the_demo_grid():
    base = load_config("configs/demo.yaml")
    made = {name: study_config(base, name, cpu_seconds=120.0, every=10) for name in CONFIGS}
    assert made["full"].data.patch_size == [80, 96, 16]  # the whole axial extent, the band's depth
    assert made["patches"].data.patch_size == [40, 48, 16]
    assert made["patches+coords"].data.patch_size == [40, 48, 16]
    assert made["mixed+coords"].data.patch_size == [80, 96, 16]
    assert made["mixed"].data.patch_size == [80, 96, 16]
    assert [made[n].data.patch.coordinates for n in CONFIGS] == [False, False, True, True, False]
    assert [made[n].data.patch.schedule for n in CONFIGS] == ["fixed", "fixed", "fixed", "mixed", "mixed"]
    for cfg in made.values():
        assert cfg.train.max_cpu_seconds == 120.0  # the budget is the trainer's own CPU clock, not steps
        assert cfg.train.max_steps is None
        assert cfg.train.max_seconds is None
        assert cfg.train.checkpoint_every == 10
        assert cfg.train.keep_checkpoints >= 10**6  # every checkpoint is a point of the curve
        assert cfg.data.task == "translate"  # the demo's T1 -> T2 setup is kept
        assert cfg.train.seed == base.train.seed
    assert study_config(base, "patches", cpu_seconds=120.0, every=10, seed=3).train.seed == 3
    assert made["full"].data.demo_split == "below"
    assert study_config(base, "full", cpu_seconds=1.0, every=1, split="around").data.demo_split == "around"


def _row(points: list[tuple[float, float]]) -> dict:
    return {"status": "ok", "label": "x", "curve": [{"step": i + 1, "cpu_s": c, "ssim_mask": s, "psnr_mask": 20.0}
                                                    for i, (c, s) in enumerate(points)]}


ROWS = {
    "full": _row([(100.0, 0.50), (200.0, 0.60)]),
    "patches+coords": _row([(50.0, 0.55), (90.0, 0.62), (200.0, 0.70)]),
    "patches": _row([(60.0, 0.40), (200.0, 0.58)]),
    "mixed+coords": _row([(150.0, 0.61), (200.0, 0.65)]),
}
FLOPS = {
    "patchddm": {"status": "ok", "flops": 3e12, "flops_per_voxel": 3.0e6, "in_channels": 8, "parameters": 24},
    "idm-study": {"status": "ok", "flops": 6e11, "flops_per_voxel": 0.6e6, "in_channels": 5, "parameters": 1},
    "idm": {"status": "ok", "flops": 1.6e12, "flops_per_voxel": 1.6e6, "in_channels": 8, "parameters": 2},
}


def test_goal_verdicts_follow_the_measurements():
    goals = judge(ROWS, FLOPS)
    ttq = goals["time_to_full_quality"]
    assert ttq["patches+coords"]["reached_at_cpu_s"] == 90.0
    assert ttq["patches+coords"]["time_ratio"] == pytest.approx(0.45)
    assert ttq["patches+coords"]["met"]
    assert ttq["patches+coords"]["equal_time_ssim"] == 0.70
    late = judge({"full": ROWS["full"], "late": _row([(90.0, 0.61), (210.0, 0.70)])}, {})["time_to_full_quality"]
    assert late["late"]["equal_time_cpu_s"] == 90.0  # the point past the full grid's time is not "equal time"
    assert late["late"]["met"]
    assert ttq["patches"]["reached_at_cpu_s"] is None
    assert not ttq["patches"]["met"]
    assert ttq["mixed+coords"]["time_ratio"] == pytest.approx(0.75)
    assert not ttq["mixed+coords"]["met"]  # reached, but later than half the full grid's time
    assert goals["flops_per_voxel"]["idm-study"] == {"ratio_vs_patchddm": pytest.approx(0.2), "met": True}
    assert goals["flops_per_voxel"]["idm"]["ratio_vs_patchddm"] == pytest.approx(1.6 / 3.0)
    assert not goals["flops_per_voxel"]["idm"]["met"]


def test_a_failed_reference_leaves_the_time_goal_unmeasured():
    rows = {**ROWS, "full": {"status": "error", "error": "boom"}}
    assert judge(rows, {})["time_to_full_quality"] == {}
    assert judge(rows, {})["flops_per_voxel"] == {}


def test_the_goal_over_seeds_needs_a_majority_and_counts_never_reached_as_infinite():
    slow = {"full": ROWS["full"], "patches+coords": _row([(150.0, 0.61), (200.0, 0.65)]),
            "patches": _row([(60.0, 0.40), (200.0, 0.58)])}
    per_seed = {"0": judge(ROWS, {})["time_to_full_quality"], "1": judge(slow, {})["time_to_full_quality"],
                "2": judge(ROWS, {})["time_to_full_quality"]}
    over = summarise(per_seed)
    assert over["patches+coords"]["time_ratios"] == {"0": pytest.approx(0.45), "1": pytest.approx(0.75),
                                                     "2": pytest.approx(0.45)}
    assert over["patches+coords"]["median_time_ratio"] == pytest.approx(0.45)
    assert over["patches+coords"]["met_seeds"] == 2
    assert over["patches+coords"]["met"]  # two of three seeds
    assert over["patches"]["median_time_ratio"] is None  # never reached with any seed
    assert not over["patches"]["met"]
    two = summarise({"0": per_seed["0"], "1": per_seed["1"]})
    assert two["patches+coords"]["met_seeds"] == 1
    assert not two["patches+coords"]["met"]  # one of two is no majority
    assert two["patches+coords"]["median_time_ratio"] == pytest.approx(0.6)


def test_the_report_files(tmp_path: Path):
    meta = {"machine": {"cpu": "test", "cores": 1}, "command": "python -m benchmarks.patch_study --out x",
            "config": "demo.yaml",
            "cpu_seconds": 200.0, "flops_size": 128}
    write_report(tmp_path, {"0": ROWS, "1": ROWS}, FLOPS, meta)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["seeds"]["1"]["goals"]["patches+coords"]["met"] is True
    assert report["goals"]["time_to_full_quality"]["patches+coords"]["met_seeds"] == 2
    text = (tmp_path / "report.md").read_text()
    assert "## Seed 0" in text
    assert "## Seed 1" in text
    assert "patches+coords reaches the full grid's final SSIM 0.6000" in text
    assert "ratio 0.45" in text
    assert "met with 2 of 2 seeds" in text
    assert "idm-study: 0.20x PatchDDM-3D's FLOPs per voxel" in text
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "fault"),
    [
        (["--configs", "full,giant"], "--configs: unknown configuration"),
        (["--cpu-seconds", "0"], "--cpu-seconds: expected a number > 0"),
        (["--flops-size", "96"], "--flops-size: expected a positive multiple of 64"),
        (["--points", "0"], "--points: expected an integer >= 1"),
        (["--seeds", "0,x"], "--seeds: expected distinct integers"),
        (["--seeds", "1,1"], "--seeds: expected distinct integers"),
        (["--jobs", "0"], "--jobs: expected an integer >= 1"),
    ],
)
def test_study_option_errors_are_one_line(tmp_path: Path, capsys, args, fault):
    assert lab(patch_study, ["--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fault in err
    assert len(err.splitlines()) == 1


def test_a_configuration_trains_for_its_cpu_budget_and_scores_every_checkpoint(tmp_path: Path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"task": "translate", "sources": ["t1"], "targets": ["t2"]},
                                   "model": {"name": "idm", "kwargs": TINY_IDM},
                                   "diffusion": {"num_train_timesteps": 20, "prediction_type": "sample"},
                                   "train": {"max_steps": None, "max_cpu_seconds": 1.0},
                                   "sample": {"steps": 2}}))
    budget = 1.5
    row = train_child({"name": "patches+coords", "config": str(cfg), "out": str(tmp_path / "run"),
                       "cpu_seconds": budget, "points": 3, "seed": 2, "split": "around"})
    curve = row["curve"]
    assert row["seed"] == 2
    assert row["split"] == "around"
    assert row["coordinates"] is True
    assert row["train_cpu_s"] >= budget  # the trainer's CPU clock ended the run, not a step count
    assert curve[-1]["step"] == row["steps"]
    assert curve[-1]["cpu_s"] == pytest.approx(row["train_cpu_s"])
    assert len(curve) >= 2  # the spaced checkpoints are all kept and scored, plus the last step
    assert [p["cpu_s"] for p in curve] == sorted(p["cpu_s"] for p in curve)
    assert all(0.0 <= p["ssim_mask"] <= 1.0 for p in curve)


def test_bench_sampling_measures_a_whole_volume_step_with_coordinates(tmp_path: Path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"task": "translate", "sources": ["t1"], "targets": ["t2"]},
                                   "model": {"name": "idm", "kwargs": TINY_IDM}}))
    out = tmp_path / "rows.jsonl"
    assert lab(sampling, ["--sizes", "16,24", "--config", str(cfg), "--threads", "1",
                 "--json-out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["size"] for r in rows] == [16, 24]
    for r in rows:
        assert r["status"] == "ok"
        assert r["in_channels"] == 5  # noisy t2, t1, three coordinates
        assert r["step_s"] > 0
        assert r["first_step_growth_mib"] >= 0
    assert "steady µs / voxel" in capsys.readouterr().out
