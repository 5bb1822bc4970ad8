"""The benchmark harness: tables, JSON, fresh-process runs, memory growth, FLOP counts, bisection."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

import idm3d.allocator as allocator
from idm3d.bench.harness import (
    Column,
    count_step_flops,
    json_line,
    machine_info,
    markdown_table,
    parse_sizes,
    reset_peak_rss,
    run_config,
)
from idm3d.bench.max_size import bisect_max
from idm3d.children import machine_available_bytes
from idm3d.errors import ConfigError

MIB = 2**20
GIB = 2**30

# A child module for fresh-process runs, written into tmp_path and found through PYTHONPATH.
CHILD_MODULE = textwrap.dedent(
    """
    import time

    import torch
    from torch import nn

    from idm3d.bench.harness import measure_training_step


    def linear(config):
        torch.manual_seed(0)
        model = nn.Linear(8, 8)
        x = torch.randn(config["batch"], 8)
        extra = config.get("alloc_mib", 0)

        def step():
            if extra:  # a known temporary allocation, touched so it is resident
                big = torch.ones(extra * 2**20 // 4)
                big.add_(1)
                time.sleep(0.3)
                del big
            model(x).square().sum().backward()

        return measure_training_step(model, step, "cpu", warmup=1, repeats=2)


    def fails(config):
        raise ValueError("boom: bad option " + str(config["value"]))


    def sleeps(config):
        time.sleep(60)
        return {}
    """
)


@pytest.fixture
def child_target(tmp_path, monkeypatch):
    (tmp_path / "bench_child_mod.py").write_text(CHILD_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "bench_child_mod"


@pytest.mark.parametrize(
    ("value", "fmt", "expected"),
    [
        (1234567, ",", "1,234,567"),
        (0.123456, ".3f", "0.123"),
        (None, ".1f", "n/a"),
        (float("nan"), ".1f", "n/a"),
        ("a|b", "", "a\\|b"),
        ("text", ".2f", "text"),
        (True, ".2f", "True"),
    ],
)
def test_markdown_cells(value, fmt, expected):
    table = markdown_table([{"v": value}], [Column("v", "V", fmt)])
    assert table.splitlines()[-1] == f"| {expected} |"


def test_markdown_table_shape():
    rows = [{"a": 1, "b": 2.5}, {"a": 3}]
    table = markdown_table(rows, [Column("a", "A"), Column("b", "B", ".1f")]).splitlines()
    assert table[0] == "| A | B |"
    assert table[1] == "|---|--:|"
    assert table[2:] == ["| 1 | 2.5 |", "| 3 | n/a |"]


def test_json_line_is_strict_json():
    line = json_line({"x": float("inf"), "y": [float("nan"), 1.5], "z": "s"})
    assert "\n" not in line
    assert json.loads(line) == {"x": None, "y": [None, 1.5], "z": "s"}


def test_machine_info_names_the_machine():
    info = machine_info("cpu")
    assert info["torch"] == torch.__version__
    assert info["cpu_cores"] >= 1
    assert info["cpu_model"]
    assert info["gpu"] is None


@pytest.mark.parametrize(
    ("text", "ok"), [("32,64", [32, 64]), (" 16 ", [16]), ("12", None), ("a,16", None), ("", None)]
)
def test_parse_sizes(text, ok):
    if ok is None:
        with pytest.raises(ConfigError, match="--sizes"):
            parse_sizes(text)
    else:
        assert parse_sizes(text) == ok


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-only")
def test_subprocess_run_returns_json_with_rss_growth(child_target):
    result = run_config(f"{child_target}:linear", {"batch": 4, "alloc_mib": 200}, timeout_s=120)
    assert result["status"] == "ok", result
    assert result["batch"] == 4  # the config is echoed
    assert result["step_s"] > 0
    assert result["timed_steps"] == 2
    # within a few MiB: pages released during the step can offset the count slightly
    assert 0.95 * 200 <= result["peak_growth_mib"] < 200 + 64
    # addmm forward + weight-gradient mm (the input needs no gradient): 2 * (2 * B * 8 * 8)
    assert result["flops"] == 2 * 2 * 4 * 8 * 8
    assert result["energy_j_per_step"] is None  # no GPU: the fields exist and are null


def test_subprocess_huge_pages_follow_the_allocator_setting(child_target, monkeypatch):
    monkeypatch.setattr(allocator, "_USER_HUGE_PAGES", None)  # as if the user set nothing
    for setting, expected in (("tuned", True), ("system", False)):
        result = run_config(f"{child_target}:linear", {"batch": 1, "malloc": setting}, timeout_s=120)
        assert result["status"] == "ok", result
        assert result["huge_pages"] is expected, setting


def test_subprocess_errors_are_one_line(child_target):
    result = run_config(f"{child_target}:fails", {"value": 7}, timeout_s=120)
    assert result["status"] == "error"
    assert "ValueError" in result["error"]
    assert "bad option 7" in result["error"]
    assert "\n" not in result["error"]


def test_subprocess_timeout_kills_the_child(child_target):
    result = run_config(f"{child_target}:sleeps", {}, timeout_s=3)
    assert result["status"] == "timeout"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-only")
def test_watchdog_kills_a_child_over_budget(child_target):
    config = {"batch": 2, "alloc_mib": 400}
    killed = run_config(f"{child_target}:linear", config, timeout_s=120, growth_limit_bytes=100 * MIB)
    assert killed["status"] == "over_budget"
    assert killed["watchdog_peak_rss_mib"] > 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-only")
def test_watchdog_stops_a_child_when_the_machine_runs_short(child_target):
    """A budget the machine cannot hold beside the child's baseline ends as ``machine_full``, not in the kernel's
    OOM killer: with a reserve above what the machine has, the child is stopped at once, within its budget."""
    reserve = machine_available_bytes() + 64 * GIB
    killed = run_config(f"{child_target}:sleeps", {}, timeout_s=60, growth_limit_bytes=64 * GIB,
                        machine_reserve_bytes=reserve)
    assert killed["status"] == "machine_full"
    assert "machine_full" in killed["error"]


@pytest.mark.skipif(not reset_peak_rss(), reason="VmHWM cannot be reset here")
@pytest.mark.parametrize("alloc_mib", [128, 256])
def test_rss_growth_detects_a_known_allocation(child_target, alloc_mib):
    # In a fresh process, as the benchmarks measure: inside the test process the heap left by earlier
    # tests can serve the allocation from pages already resident (growth 0, seen in a full-suite run).
    result = run_config(f"{child_target}:linear", {"batch": 2, "alloc_mib": alloc_mib}, timeout_s=120)
    assert result["status"] == "ok", result
    assert result["memory_method"] == "vmhwm"
    # The steady step is the clean figure; the first also pays one-off start-up allocations.
    assert 0.95 * alloc_mib <= result["steady_growth_mib"] < alloc_mib + 48
    assert result["first_step_growth_mib"] >= 0.95 * alloc_mib


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize(("cin", "cout", "k", "size"), [(2, 4, 3, 8), (3, 5, 1, 6)])
def test_conv_flops_match_analytic_count(cin, cout, k, size, input_grad):
    conv = nn.Conv3d(cin, cout, k, padding=k // 2)
    x = torch.randn(1, cin, size, size, size, requires_grad=input_grad)
    forward = 2 * cout * size**3 * cin * k**3  # a multiply-add counts as 2
    assert count_step_flops(conv, lambda: conv(x)) == forward
    # backward: the weight gradient costs a forward, the input gradient (when wanted) another
    assert count_step_flops(conv, lambda: conv(x).sum().backward()) == forward * (3 if input_grad else 2)


def test_flops_count_the_rebuilt_activations():
    from benchmarks.segment_depth import CoreModel

    x, features = torch.randn(1, 8, 8, 8, 8), torch.randn(1, 16)
    flops = {}
    for efficient in (True, False):
        torch.manual_seed(0)
        model = CoreModel(2, 8, 16, efficient)
        flops[efficient] = count_step_flops(model, lambda m=model: m(x, features).square().mean().backward())
    with torch.no_grad():
        emb = model.embed(features)
        segment_forward = count_step_flops(model, lambda: model.segment(x, emb))
    # The memory-efficient backward re-runs each coupling's sub-network once more than autograd, and its lean
    # graph recomputes the GroupNorm-SiLU in front of each sub-network's first convolution (cheap next to
    # the convolutions) instead of keeping its output.
    extra = flops[True] - flops[False]
    assert segment_forward > 0
    assert segment_forward <= extra <= 1.01 * segment_forward


@pytest.mark.parametrize("threshold", [0, 1, 5, 9, 16, 40])
def test_bisect_max_finds_the_largest_fitting(threshold):
    probes = []

    def fits(k):
        probes.append(k)
        return k <= threshold

    assert bisect_max(fits, 16) == min(threshold, 16)
    assert len(probes) <= 5  # log2(16) + 1


def test_missing_benchmark_module_is_a_one_line_error(monkeypatch, capsys):
    from idm3d.cli import bench as cli_bench
    from idm3d.cli.main import main

    monkeypatch.setattr(
        cli_bench, "BENCHMARKS", (*cli_bench.BENCHMARKS, ("ghost", "idm3d.bench.no_such_module", "missing"))
    )
    assert main(["bench", "ghost"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idm3d: error: bench ghost: not available")
    assert "\n" not in err


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        # (net, largest fitting cube, hit the largest probed) with a fake 1 GiB budget
        ("64,128,192", {"idm": (192, True), "patchddm": (128, False)}),
        (None, {"idm": (256, True), "patchddm": (128, False)}),  # bisection up to --max 256
    ],
)
def test_max_size_reports_the_largest_fitting_cube(monkeypatch, capsys, sizes, expected):
    import argparse

    import idm3d.bench.max_size as max_size

    limits = {"idm": 10**9, "patchddm": 150}  # PatchDDM-3D "fits" up to 150^3 (edges multiples of 64)
    calls = []

    def fake_run(target, config, timeout_s, growth_limit_bytes):
        calls.append((config["net"], config["size"]))
        fits = config["size"] <= limits[config["net"]]
        return {"status": "ok" if fits else "over_budget", "peak_growth_mib": 100.0 if fits else None}

    monkeypatch.setattr(max_size, "run_config", fake_run)
    parser = argparse.ArgumentParser()
    max_size.add_arguments(parser)
    argv = ["--budget-gib", "1", "--nets", "idm,patchddm", "--json"] + (["--sizes", sizes] if sizes else [])
    assert max_size.run(parser.parse_args(argv)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    got = {r["net"]: (r["max_size"], r["hit_max"]) for r in rows}
    assert got == expected
    if sizes:  # listed sizes smallest first, up to the first that does not fit
        assert calls == [("idm", 64), ("idm", 128), ("idm", 192), ("patchddm", 64), ("patchddm", 128),
                         ("patchddm", 192)]
