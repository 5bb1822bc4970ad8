"""benchmarks/whole_vs_windows.py: its window option and the per-setting summary of the committed study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks.whole_vs_windows import WHOLE, parse_windows, summarise

from idm3d.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_windows_parse_and_bad_ones_name_the_option():
    assert parse_windows("32x32x16, 64X64x16") == [(32, 32, 16), (64, 64, 16)]
    for bad in ("32x32", "0x32x16", "axbxc"):
        with pytest.raises(ConfigError, match="--windows"):
            parse_windows(bad)


def test_summary_means_and_deltas_follow_the_rows():
    rows = [json.loads(line) for line in (ROOT / "docs/bench/whole-vs-windows.jsonl").read_text().splitlines()]
    summary = {s["setting"]: s for s in summarise(rows)}
    whole = summary[WHOLE]
    assert whole["voxels_per_band"] == 1.0
    assert whole["cpu_vs_whole"] == 1.0
    assert whole["ssim_vs_whole"] == 0.0
    for setting, s in summary.items():
        mine = [r for r in rows if r["setting"] == setting]
        assert s["samples"] == len(mine)
        assert s["ssim_min"] <= s["ssim"] <= s["ssim_max"]
        assert s["ssim_vs_whole"] == pytest.approx(s["ssim"] - whole["ssim"])
        assert s["cpu_vs_whole"] == pytest.approx(sum(r["cpu_s"] for r in mine) / len(mine) / whole["cpu_s"])
        if setting != WHOLE:  # overlapping windows send more than the band through the network per step
            assert s["voxels_per_band"] > 1.0
            assert s["network_calls"] > whole["network_calls"]
