"""Shared test helpers: synthetic phantom data sets written with nibabel, and weight perturbation.

``from helpers import write_brats_folder`` works in any test module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair", "seg")
# BraTS files store x and y flipped relative to RAS; reading them exercises reorientation.
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
# Tissue intensities (background, "white matter", "grey matter", "CSF") per modality.
_CONTRAST = {
    "t1": (0.0, 110.0, 70.0, 25.0),
    "t1ce": (0.0, 115.0, 75.0, 30.0),
    "t2": (0.0, 45.0, 80.0, 160.0),
    "flair": (0.0, 60.0, 90.0, 20.0),
}


def phantom(shape: Sequence[int], modality: str, seed: int = 0) -> np.ndarray:
    """A skull-stripped 'brain': ellipsoid with a core, a shell and two 'ventricles'; float32 or labels."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radii = np.array([0.8, 0.85, 0.75]) * (1 + 0.05 * rng.standard_normal(3))
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, radii)))
    ventricles = np.sqrt(((np.abs(grids[0]) - 0.25) / 0.15) ** 2 + (grids[1] / 0.35) ** 2 + (grids[2] / 0.25) ** 2) < 1
    tissue = np.zeros(shape, dtype=np.int16)
    tissue[r < 1] = 2
    tissue[r < 0.7] = 1
    tissue[ventricles & (r < 0.7)] = 3
    if modality == "seg":
        labels = np.zeros(shape, dtype=np.int16)
        labels[(r < 0.25) & (grids[0] > 0)] = 4
        labels[(r < 0.15) & (grids[0] > 0)] = 1
        return labels
    contrast = np.asarray(_CONTRAST.get(modality, _CONTRAST["t1"]), dtype=np.float32)
    image = contrast[tissue] + np.where(tissue > 0, rng.normal(0, 2.0, shape), 0.0)
    return np.clip(image, 0, None).astype(np.float32)


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray = BRATS_AFFINE, *, as_int16: bool = False) -> Path:
    """Save ``data`` with nibabel; ``as_int16`` stores int16 with a scale factor, like scanner exports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_int16:
        image = nib.Nifti1Image(np.round(np.asarray(data) * 4).astype(np.int16), affine)
        image.header.set_slope_inter(0.25, 0.0)
    else:
        image = nib.Nifti1Image(np.asarray(data), affine)
    nib.save(image, str(path))
    return path


def write_brats_folder(
    root: Path,
    n_cases: int = 3,
    shape: Sequence[int] = (20, 24, 16),
    modalities: Sequence[str] = BRATS_MODALITIES,
    *,
    prefix: str = "BraTS20_Training_",
    suffix: str = ".nii.gz",
    seed: int = 0,
) -> Path:
    """Write ``root/<prefix>001/<prefix>001_<modality><suffix>`` ... for ``n_cases`` phantom cases.

    t1ce is stored as int16 with a scale factor; seg as int16 labels {0, 1, 4}.
    """
    root = Path(root)
    for i in range(1, n_cases + 1):
        case = f"{prefix}{i:03d}"
        for m in modalities:
            data = phantom(shape, m, seed=seed * 1000 + i)
            write_volume(root / case / f"{case}_{m}{suffix}", data, as_int16=(m == "t1ce"))
    return root


def perturb(module: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Move every parameter away from its (identity / Haar / zero) initialisation, reproducibly from ``seed``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


# The smallest IDMUNet the CLI tests train (two levels, no attention).
TINY_IDM = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, False]}


def tiny_run_config(
    data: dict,
    train: dict | None = None,
    sample: dict | None = None,
    *,
    diffusion: dict | None = None,
    model_kwargs: dict | None = None,
) -> dict:
    """A config of a few-step run of :data:`TINY_IDM` on 16^3 patches (``data`` holds root, task, modalities).

    ``train``, ``sample`` and ``diffusion`` update the section's tiny defaults; ``model_kwargs`` replaces
    :data:`TINY_IDM` (a copy goes into the config, so a test editing it changes no other test).
    """
    return {
        "data": {"patch_size": [16, 16, 16], "test_fraction": 0.34, **data},
        "model": {"name": "idm", "kwargs": dict(TINY_IDM if model_kwargs is None else model_kwargs)},
        "diffusion": {"num_train_timesteps": 50, **(diffusion or {})},
        "train": {"max_steps": 3, "checkpoint_every": 2, "log_every": 1, "progress": False, **(train or {})},
        "sample": {"steps": 2, **(sample or {})},
    }


def t1_to_t2(root: Path | None, **data) -> dict:
    """The ``data`` section of a t1 -> t2 translation of the phantom folder ``root`` (``None``: the demo data)."""
    return {"root": None if root is None else str(root), "task": "translate", "sources": ["t1"], "targets": ["t2"],
            **data}


def train_tiny_run(base: Path, train: dict | None = None, sample: dict | None = None) -> Path:
    """Train a :func:`tiny_run_config` t1 -> t2 run of three 24^3 phantom cases (``base/data``) into ``base/run``.

    In-process, on one torch thread; ``train`` and ``sample`` update the tiny defaults. Returns the run folder.
    """
    from idm3d.runs.config import config_from_dict
    from idm3d.training.trainer import train as train_run

    root = write_brats_folder(base / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    cfg = config_from_dict(tiny_run_config(t1_to_t2(root), train, sample))
    with torch_threads(1):
        return train_run(cfg, base / "run")


def torchrun_command() -> list[str]:
    """This environment's torchrun: its script, else ``python -m torch.distributed.run``."""
    script = Path(sys.executable).parent / "torchrun"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def gloo_group(init_file: str, rank: int, world: int, threads: int = 1) -> Iterator[None]:
    """The block as rank ``rank`` of a ``world``-process gloo group (an ``mp.spawn`` worker's body).

    A normal end meets the other processes at a barrier before the group is destroyed, as
    :func:`idm3d.training.distributed.shutdown` does, so no process tears its connections down while
    another still uses them; a crash prints every thread's Python stack (faulthandler).
    """
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        gc.collect()  # as idm3d.training.distributed.shutdown does (pytorch#179291)
        dist.destroy_process_group()
