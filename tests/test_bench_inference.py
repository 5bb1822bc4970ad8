"""``idm3d bench memory|max-size --inference [--sampling-step]``: the modes, and peaks in maps T."""

from __future__ import annotations

import argparse
import json

import pytest

from idm3d.bench.compare import add_ratios, map_mib
from idm3d.bench.memory import add_arguments, child, inference_mode
from idm3d.errors import ConfigError


def test_sampling_step_runs_one_chain_step_of_each_net() -> None:
    for net in ("idm", "conv-stack"):
        result = child({"net": net, "size": 16, "batch": 1, "device": "cpu", "warmup": 0, "repeats": 0,
                        "count_flops": False, "mode": "sampling-step"})
        assert result["first_step_growth_mib"] >= 0
        assert result["first_step_s"] > 0


def test_peaks_are_given_in_full_resolution_maps() -> None:
    rows = [{"net": "idm", "size": 64, "batch": 2, "mode": "inference", "status": "ok",
             "first_step_growth_mib": 128.0, "steady_growth_mib": None, "peak_growth_mib": 128.0}]
    add_ratios(rows)
    assert map_mib(64, 2) == 64.0  # 32 channels x 64^3 x 4 bytes x 2 samples
    assert rows[0]["first_step_growth_T"] == pytest.approx(2.0)
    assert "steady_growth_T" not in rows[0]


def test_modes_from_the_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert inference_mode(parser.parse_args([])) == "train"
    assert inference_mode(parser.parse_args(["--inference"])) == "inference"
    assert inference_mode(parser.parse_args(["--inference", "--sampling-step"])) == "sampling-step"
    with pytest.raises(ConfigError, match="--sampling-step"):
        inference_mode(parser.parse_args(["--sampling-step"]))


def test_max_size_inference_probes_the_no_grad_call(monkeypatch, capsys) -> None:
    import idm3d.bench.max_size as max_size

    modes = []

    def fake_run(target, config, timeout_s, growth_limit_bytes):
        modes.append(config["mode"])
        return {"status": "ok", "peak_growth_mib": 10.0}

    monkeypatch.setattr(max_size, "run_config", fake_run)
    parser = argparse.ArgumentParser()
    max_size.add_arguments(parser)
    args = parser.parse_args(["--budget-gib", "1", "--nets", "idm", "--sizes", "64", "--inference",
                              "--sampling-step", "--json"])
    assert max_size.run(args) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert modes == ["sampling-step"]
    assert rows[0]["mode"] == "sampling-step"
    assert rows[0]["max_size"] == 64
