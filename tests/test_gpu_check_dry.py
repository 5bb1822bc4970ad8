"""benchmarks/gpu_check.sh's dry run: every step of the GPU check, on CPU at tiny sizes, passes and writes its JSON.

The GPU check runs once on a lent machine with minutes to spare; a broken step found there costs the loan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = [
    "dependencies", "environment", "exactness", "memory", "inference", "bf16",
    "synthetic-data", "train", "train-summary", "max-size", "summary",
]  # fmt: skip


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)  # the script sets its own (src/ and the checkout)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == STEPS
    assert all(s["rc"] == 0 for s in steps), steps

    for name in ("env.json", "gpu_check.json", "train_summary.json"):
        json.loads((out / name).read_text())
    for name in ("memory.jsonl", "inference.jsonl", "memory_bf16.jsonl", "max_size.jsonl", "train_metrics.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]
        assert rows, name
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert report["all_steps_ok"] is True
    assert {"gpu", "driver", "torch"} <= set(report)
    assert report["torch"]
    assert set(report["goals"]) >= {"step_256_gib", "largest_cube", "peak_vs_monai_ckpt_128"}
    assert report["goals"]["time_vs_plain_16"]["value"] is not None  # the goals are computed from the rows
    assert "DRY RUN" in (out / "SUMMARY.md").read_text()
    assert "exactness" in (out / "SUMMARY.md").read_text()
