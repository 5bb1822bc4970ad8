"""``idm3d bench memory``: first-step and steady fields, FLOPs on known nets, ratios to every baseline."""

from __future__ import annotations

import pytest

from idm3d.bench.compare import add_ratios
from idm3d.bench.memory import child


def test_child_measures_first_and_steady_step_and_counts_known_flops():
    n = 8
    result = child({"net": "conv-stack", "size": n, "batch": 1, "device": "cpu", "warmup": 1, "repeats": 1})
    forward = 2 * 32 * 32 * 27 * n**3  # one Conv3d(32, 32, 3), multiply-adds counted as 2
    # 8 forwards, 8 weight gradients, 7 input gradients (the input itself needs none).
    assert result["flops"] == 23 * forward
    for key in ("first_step_growth_mib", "steady_growth_mib", "first_step_s", "first_step_cpu_s", "step_cpu_s"):
        assert result[key] is not None, key
        assert result[key] >= 0, key
    assert result["parameters"] == 8 * (32 * 32 * 27 + 32)


def test_first_step_only_when_nothing_else_is_asked():
    result = child({"net": "conv-stack", "size": 8, "batch": 1, "device": "cpu", "warmup": 0, "repeats": 0,
                    "count_flops": False})
    assert result["steady_growth_mib"] is None
    assert result["timed_steps"] == 0
    assert result["peak_growth_mib"] == result["first_step_growth_mib"]


def test_inference_counts_forward_only():
    n = 8
    result = child({"net": "conv-stack", "size": n, "batch": 2, "device": "cpu", "repeats": 1, "mode": "inference"})
    assert result["flops"] == 8 * 2 * 2 * 32 * 32 * 27 * n**3


def test_every_row_is_divided_by_every_baseline():
    def row(net, memory, cpu, flops):
        return {"net": net, "size": 64, "malloc": "tuned", "mode": "train", "status": "ok",
                "first_step_growth_mib": memory, "steady_growth_mib": memory, "step_cpu_s": cpu, "step_s": cpu,
                "flops": flops, "parameters": 10}

    rows = [row("idm", 100.0, 2.0, 10**9), row("monai-ckpt", 400.0, 4.0, 4 * 10**9),
            row("patchddm", 1000.0, 8.0, 8 * 10**9), row("conv-stack", 10.0, 0.5, 10**9)]
    add_ratios(rows)
    idm = rows[0]
    assert set(idm["ratios"]) == {"monai-ckpt", "patchddm"}
    assert idm["ratios"]["monai-ckpt"]["memory_first"] == pytest.approx(0.25)
    assert idm["ratios"]["patchddm"]["flops"] == pytest.approx(0.125)
    assert idm["ratios"]["patchddm"]["cpu_time"] == pytest.approx(0.25)
    assert idm["throughput_vs_conv_stack"] == pytest.approx((1 / 2.0) / (1 / 0.5))
    assert "monai-ckpt" not in rows[1]["ratios"]
    assert "patchddm" in rows[1]["ratios"]


def test_flops_only_counts_without_measuring():
    n = 8
    result = child({"net": "conv-stack", "size": n, "batch": 1, "device": "cpu", "flops_only": True})
    assert result == {"flops": 23 * 2 * 32 * 32 * 27 * n**3, "parameters": 8 * (32 * 32 * 27 + 32)}
