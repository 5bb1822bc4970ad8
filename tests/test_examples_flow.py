"""``examples/monai_ddpm_3d.py --objective rflow``: MAISI's rectified-flow loop with the IDMUNet (``--smoke``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_monai_example_flow_variant(tmp_path: Path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(EXAMPLES / "monai_ddpm_3d.py"), "--smoke", "--objective", "rflow",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "rflow"
    assert len(summary["losses"]) == 2
    assert np.isfinite(summary["losses"]).all()
    sample = np.asarray(nib.load(str(out / "sample_euler.nii.gz")).dataobj)
    assert sample.shape == (16, 16, 16)
    assert sample.std() > 0
    assert np.abs(sample).max() <= 1.0 + 1e-5
