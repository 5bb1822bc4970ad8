"""Data and output helpers shared by the example scripts in this folder (MONAI transforms, no idm3d internals).

Two sources of training volumes, both scaled to [-1, 1] (the range MONAI's schedulers clip samples to):

- a folder of NIfTI files (``*.nii`` / ``*.nii.gz``): MONAI transforms load each one (once, into memory),
  reorient it to RAS, scale intensities by percentiles (0.5-99.5) and centre-crop or pad it to a cube of
  ``size``;
- no folder: synthetic volumes, each a dark background with one bright ellipsoid of random centre, radii
  and intensity plus a fainter inner ellipsoid, so a model has shapes to learn and samples can be judged
  by eye. They are made from a seed, so every run sees the same data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms
from monai.data import DataLoader, Dataset


def synthetic_volumes(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` volumes of shape ``(1, size, size, size)`` in [-1, 1]: one ellipsoid in another on a dark background."""
    if n < 1 or size < 2:
        raise ValueError(f"synthetic_volumes: need n >= 1 and size >= 2, got n={n}, size={size}")
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1.0, 1.0, size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, D, H, W)
    volumes = []
    for _ in range(n):
        centre = (torch.rand(3, 1, 1, 1, generator=gen) - 0.5) * 0.3
        radii = 0.5 + 0.35 * torch.rand(3, 1, 1, 1, generator=gen)  # the ellipsoid fills about 7-30 % of the cube
        r2 = (((grid - centre) / radii) ** 2).sum(0)
        bright = 0.5 + 0.5 * torch.rand(1, generator=gen)
        volume = torch.where(r2 <= 1.0, bright - 1.0, torch.full_like(r2, -1.0))
        volume = torch.where(r2 <= 0.3, volume + 0.6, volume)
        volumes.append(volume.clamp(-1.0, 1.0).unsqueeze(0))
    return volumes


def nifti_volumes(folder: Path, size: int) -> list[torch.Tensor]:
    """Every NIfTI file in ``folder`` as a ``(1, size, size, size)`` volume in [-1, 1], through MONAI transforms."""
    if not Path(folder).is_dir():
        raise SystemExit(f"--data-dir {folder}: not a folder")
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise SystemExit(f"--data-dir {folder}: no .nii or .nii.gz files found")
    # MONAI 1.6's LoadImage registers every reader it knows; with pydicom installed and no nvImageCodec its
    # DICOM reader logs and warns on every construction, which says nothing about these NIfTI files.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        reader = transforms.LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)
    load = transforms.Compose([
        reader,
        transforms.Lambda(func=lambda x: x[:1]),  # the first channel of multi-channel files
        transforms.Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),  # NIfTI world axes
        transforms.ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=-1.0, b_max=1.0, clip=True),
        transforms.ResizeWithPadOrCrop(spatial_size=(size, size, size), value=-1.0),
        transforms.EnsureType(dtype=torch.float32, track_meta=False),
    ])
    volumes = []
    for f in files:  # loaded once, up front: a bad file stops the script before training, named
        try:
            volumes.append(load(str(f)))
        except Exception as error:
            cause = error
            while cause.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
                cause = cause.__cause__
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise SystemExit(f"--data-dir: {f}: cannot be read as a volume: {reason}") from None
    return volumes


def training_volumes(args: argparse.Namespace) -> list[torch.Tensor]:
    """The ``(1, S, S, S)`` training volumes: the NIfTI files of ``--data-dir`` or, without one, synthetic ones."""
    if args.data_dir is not None:
        return nifti_volumes(args.data_dir, args.size)
    return synthetic_volumes(args.num_volumes, args.size, args.seed)


def batches(volumes: list[torch.Tensor], batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches ``(B, 1, S, S, S)`` of ``volumes`` (MONAI's ``Dataset`` and ``DataLoader``)."""
    loader = DataLoader(Dataset(volumes), batch_size=batch_size, shuffle=True, drop_last=len(volumes) >= batch_size,
                        num_workers=0, generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options both examples take: data, sizes, output folder, device, the --smoke switch."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder of NIfTI volumes (default: synthetic ellipsoid volumes, see examples/volumes.py)")
    parser.add_argument("--num-volumes", type=int, default=16, help="synthetic volumes when no --data-dir")
    parser.add_argument("--size", type=int, default=32, help="cube edge the volumes are cropped or padded to")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="output folder (weights, samples, summary.json)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and 1-2 steps of everything: checks the script runs (seconds on a CPU)")


def device_from(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def check_finite(loss: torch.Tensor, step: int, what: str) -> float:
    """The loss as a float; stops the script with a diagnosis when it is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise SystemExit(f"{what} step {step}: loss is {value}; lower the learning rate or check the data range")
    return value


def save_volume(volume: torch.Tensor, path: Path) -> None:
    """One ``(1, D, H, W)`` volume as NIfTI with 1 mm isotropic voxels (synthetic data has no scanner grid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume[0].detach().float().cpu().numpy(), np.eye(4)), str(path))


def write_summary(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
