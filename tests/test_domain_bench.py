"""The domain-parallel benchmark's measurement, watchdog and fit (benchmarks/domain_parallel.py, domain_max_size.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from benchmarks.domain_max_size import fit_peaks, parse_probe
from benchmarks.domain_parallel import _watch, measure


def test_a_first_step_alone_is_measured_above_its_start():
    # one rank keeps the test cheap (one fresh process); tests/test_domain_parallel.py checks the halo bytes
    row = measure(1, 16, 1, 1, 0, budget=4 * 2**30)
    assert row["status"] == "ok"
    assert row["warmup"] == 0
    assert len(row["per_rank"][0]["records"]) == 1  # the first step alone
    assert row["rss_start_mib"] > 0
    assert 0 < row["peak_mib"] < row["watched_total_mib"]  # growth above the start, below the whole RSS


class _Context:
    """The part of torch's ProcessContext the watchdog uses, around one plain subprocess."""

    def __init__(self, code: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        self.processes = [self]

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def join(self, timeout: float | None = None) -> bool | None:
        try:
            return self.proc.wait(timeout) == 0
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        self.proc.kill()


def test_the_watchdog_stops_a_rank_past_its_budget_and_lets_a_small_one_finish(tmp_path):
    (tmp_path / "base0").write_text("0")
    grow = "import time\nb = b'x' * (300 * 2**20)\ntime.sleep(60)"
    stopped = _watch(_Context(grow), str(tmp_path), 100 * 2**20, None, 0.02)
    assert stopped["status"] == "over_budget"
    assert stopped["watched_growth_mib"] > 100
    assert _watch(_Context("pass"), str(tmp_path), 100 * 2**20, None, 0.02)["status"] == "ok"


def test_the_fit_recovers_the_model_it_states():
    a, b, c = 9000.0, 150.0, 300.0
    points = [{"ranks": r, "size": s, "peak_mib": a * (s / 256) ** 3 / r + b * (s / 256) ** 3 + c}
              for r, s in [(1, 128), (2, 128), (4, 256), (2, 320)]]
    fit = fit_peaks(points)
    assert fit is not None
    assert fit["a"] == pytest.approx(a)
    assert fit["b"] == pytest.approx(b)
    assert fit["c"] == pytest.approx(c)
    assert fit_peaks(points[:2]) is None


def test_a_probe_names_ranks_and_sizes():
    assert parse_probe("2:256,320") == (2, [256, 320])
    for bad in ("2", "x:256", "0:256", "2:-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_probe(bad)
