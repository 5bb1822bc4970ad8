"""Shared fixtures. Plain helpers (no fixtures needed) live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import write_brats_folder

# Tests use tiny tensors: on a 2-core machine thread hand-offs cost more than they save
# (a 16^3 conv measured 160 ms with 2 threads against 2 ms with 1 while the other core was busy).
torch.set_num_threads(1)

# The devices a test taking the ``device`` fixture runs on: CUDA where present, skipped otherwise. The CUDA
# case carries the ``cuda`` mark, so ``pytest -m cuda`` runs exactly those (benchmarks/gpu_check.sh does).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")],
    ),
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: the CUDA case of a test parametrised by the device fixture")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """``torch.device("cpu")``, then ``torch.device("cuda")`` (skipped without CUDA)."""
    return torch.device(request.param)


@pytest.fixture
def brats_dir(tmp_path: Path) -> Path:
    """A BraTS2020-layout folder with 3 phantom cases of shape 20x24x16 and all five BraTS files."""
    return write_brats_folder(tmp_path / "brats", n_cases=3)


@pytest.fixture
def make_brats_dir(tmp_path: Path):
    """Factory: ``make_brats_dir(n_cases=..., shape=..., modalities=..., name=...)`` -> folder in tmp_path."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_brats_folder(tmp_path / name, **kwargs)

    return make
