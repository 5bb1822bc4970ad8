"""Rectified-flow runs in the settings every run supports: unconditional generation with coordinate channels,
bf16 autocast training, bit-identical resume, and a DDPM run asked for a flow solver refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import idm3d
from helpers import tiny_run_config, torch_threads, write_brats_folder
from idm3d.cli.main import main
from idm3d.diffusion.coordinates import position_of
from idm3d.runs.checkpoint import latest_checkpoint
from idm3d.runs.config import config_from_dict
from idm3d.runs.logs import read_metrics
from idm3d.training.trainer import Trainer

FLOW = {"kind": "rflow", "num_train_timesteps": 50, "sample_method": "logit-normal"}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class Batches:
    """A deterministic batch per step (what PatchData yields), without files."""

    def batch(self, step: int) -> tuple[torch.Tensor, None]:
        g = torch.Generator().manual_seed(1000 + step)
        return torch.rand(2, 1, 16, 16, 16, generator=g) * 2 - 1, None


def _config(**train):
    return config_from_dict({
        "data": {"root": None, "targets": ["t1"], "patch_size": [16, 16, 16], "batch_size": 2},
        "model": {"name": "idm", "kwargs": {"channels": 8, "levels": 2, "blocks_per_level": 1,
                                            "attention_levels": [False, False]}},
        "diffusion": FLOW,
        "train": {"max_steps": 1, "progress": False, "device": "cpu", "seed": 5, "checkpoint_every": 2,
                  "log_every": 1, **train},
    })


def _grads(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def test_bf16_autocast_flow_step_is_finite_and_close_to_fp32(tmp_path: Path):
    steps = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(_config(precision=precision), tmp_path / precision, data=Batches())
        torch.manual_seed(0)
        with torch.no_grad():  # away from the identity start, as after some training
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        loss = trainer.train_step(0).loss
        steps[precision] = (loss, _grads(trainer))
    (fp32, g32), (bf16, g16) = steps["fp32"], steps["bf16"]
    assert np.isfinite(bf16)
    assert torch.isfinite(g16).all()
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert 1e-4 < float((g16 - g32).norm() / g32.norm()) < 0.1  # bf16 really ran, and stayed close


def test_flow_run_resumes_bit_identically(tmp_path: Path):
    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}

    Trainer(_config(max_steps=4), tmp_path / "full", data=Batches()).run()
    Trainer(_config(max_steps=2), tmp_path / "part", data=Batches()).run()
    Trainer(_config(max_steps=4), tmp_path / "part", data=Batches(), resume=True).run()
    assert sorted(losses(tmp_path / "full")) == [1, 2, 3, 4]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a, b = (load_file(str(latest_checkpoint(tmp_path / r / "checkpoints").with_suffix(".safetensors")))
            for r in ("full", "part"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def generate_run(tmp_path_factory) -> Path:
    """A 3-step unconditional rflow run (t1 and t2) with coordinate channels and the patch-size mix."""
    base = tmp_path_factory.mktemp("flow-generate")
    root = write_brats_folder(base / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    data = {"root": str(root), "task": "generate", "targets": ["t1", "t2"],
            "patch": {"coordinates": True, "schedule": "mixed"}}
    cfg = tiny_run_config(data, {"log": {"tensorboard": False}}, {"sampler": "heun", "steps": 3})
    cfg["diffusion"] = FLOW
    (base / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with torch_threads(1):
        assert main(["train", "--config", str(base / "cfg.yaml"), "--out", str(base / "run")]) == 0
    return base / "run"


def test_unconditional_flow_run_samples_its_grid_through_the_cli(generate_run: Path, tmp_path: Path):
    out = tmp_path / "g.nii.gz"
    assert main(["sample", "--run", str(generate_run), "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    grid = json.loads((generate_run / "data.json").read_text())["grid_shape"]
    for modality in ("t1", "t2"):
        data = np.asarray(nib.load(str(tmp_path / f"g_{modality}.nii.gz")).dataobj)
        assert list(data.shape) == grid
        assert np.isfinite(data).all()
        assert data.std() > 0


def test_flow_run_with_coordinates_samples_a_larger_grid_at_its_position(generate_run: Path):
    run = idm3d.load_run(generate_run, device="cpu", steps=2)
    assert run.pipeline.coordinates
    assert run.pipeline.prediction_type == "flow"
    assert next(p for p in run.model.parameters() if p.ndim == 5).shape[1] == 5  # t1, t2, three coordinates
    whole = run.infer(shape=(32, 24, 16), seed=1)
    assert whole.shape == (1, 2, 32, 24, 16)
    assert torch.isfinite(whole).all()
    elsewhere = run.infer(shape=(32, 24, 16), seed=1, position=position_of((8, 8, 8), (48, 40, 32)))
    assert not torch.allclose(whole, elsewhere)


def test_a_ddpm_run_asked_for_a_flow_solver_is_refused_in_one_line(tmp_path: Path, capsys):
    root = write_brats_folder(tmp_path / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1",))
    cfg = tiny_run_config({"root": str(root), "task": "generate", "targets": ["t1"]}, {"max_steps": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "x.nii.gz"),
                 "--sampler", "heun"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "sample.sampler" in err
    assert "ddpm|ddim" in err

