"""The sampling study's objectives and its tables: what the committed rows were run with, means over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import sampling_steps
from benchmarks.objectives import DDPM_DEMO, FLOW

from idm3d.demo.pipeline import demo_config
from idm3d.runs.config import config_to_dict


def test_the_pinned_ddpm_objective_is_the_demo_with_ten_ddim_calls():
    shipped, pinned = demo_config(None, []), demo_config(None, DDPM_DEMO)
    assert config_to_dict(pinned)["diffusion"] == config_to_dict(shipped)["diffusion"]
    assert (pinned.sample.sampler, pinned.sample.steps) == ("ddim", 10)
    assert (shipped.sample.sampler, shipped.sample.steps) == ("ddim", 4)  # the default since 2026-12-06


@pytest.mark.parametrize(("objective", "kind", "prediction", "warp", "base"), [
    ("ddpm", "ddpm", "sample", False, 32768),
    ("rflow", "rflow", "flow", False, 32768),
    ("rflow-x0", "rflow", "sample", False, 32768),
    ("rflow-x0-shift10", "rflow", "sample", True, 128),
])
def test_every_objective_is_written_out_whatever_the_demo_says(objective, kind, prediction, warp, base):
    # a demo config changed on every key the objectives set still yields the same run
    changed = ["diffusion.kind=rflow", "diffusion.prediction_type=sample", "diffusion.num_train_timesteps=500",
               "diffusion.use_timestep_transform=true", "diffusion.base_img_size_numel=64",
               "sample.sampler=euler", "sample.steps=3"]
    cfg = demo_config(None, [*changed, *sampling_steps.OBJECTIVES[objective]])
    d = cfg.diffusion
    assert (d.kind, d.prediction_type) == (kind, prediction)
    assert (d.use_timestep_transform, d.base_img_size_numel) == (warp, base)
    assert d.num_train_timesteps == (100 if kind == "ddpm" else 1000)
    assert cfg.sample.sampler == ("ddim" if kind == "ddpm" else "euler")
    assert cfg.sample.steps == 10
    assert FLOW[0] == "diffusion.kind=rflow"


def _row(tag: str, variant: str, sampler: str, calls: int, ssim: float, direction: str = "t1-t2") -> dict:
    return {"direction": direction, "training": variant.split("-")[0], "variant": variant, "sampler": sampler,
            "calls": calls, "ssim": ssim, "psnr": 20.0, "tag": tag}


def test_repeats_table_means_and_ranges_over_seeds_only(tmp_path: Path):
    rows = [_row("seed0", "ddpm", "ddim", 4, 0.80), _row("seed1", "ddpm", "ddim", 4, 0.86),
            _row("seed2", "ddpm", "ddim", 4, 0.83), _row("seed0", "rflow-x0-shift10", "euler", 4, 0.85),
            _row("rerun", "ddpm", "ddim", 4, 0.10),  # not a seed: left out of the means
            _row("seed0", "ddpm", "ddim", 4, 0.70, direction="t2-t1")]
    text = sampling_steps.seeds_markdown(rows)
    assert "| ddpm / ddim | 3 |" in text
    assert "0.830 [0.800, 0.860]" in text
    assert "0.850 [0.850, 0.850]" in text
    assert "*t2-t1*" in text
    assert "0.700 [0.700, 0.700]" in text
    assert sampling_steps.seeds_markdown([_row("", "ddpm", "ddim", 4, 0.8)]) == ""
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sampling_steps.main(["--docs", str(tmp_path), "--replot"]) == 0
    md = (tmp_path / "steps.md").read_text()
    assert "| ddpm [rerun] / ddim |" in md
    assert "**Repeats**" in md
    assert (tmp_path / "steps.png").stat().st_size > 10_000
