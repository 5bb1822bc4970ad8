"""``idm3d.load_run``: a trained run in one line (EMA or raw model, its scheduler, the ready pipeline),
loaded without unpickling; the top-level names are lazy."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from safetensors.torch import load_file

import idm3d
from helpers import train_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("api")
    return train_tiny_run(base, {"checkpoint_every": 3, "log": {"tensorboard": False}}, {"sampler": "ddim"})


def _weights(run_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run_dir / "checkpoints" / "step-00000003.safetensors"))
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_load_run_returns_ema_model_scheduler_and_pipeline(run_dir: Path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("load_run must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    run = idm3d.load_run(run_dir, device="cpu")
    assert isinstance(run, idm3d.LoadedRun)
    assert isinstance(run.model, idm3d.IDMUNet)
    assert run.weights == "ema"
    assert not run.model.training
    state = run.model.state_dict()
    for name, value in _weights(run_dir, "ema/").items():
        assert torch.equal(state[name], value), name
    assert isinstance(run.pipeline, idm3d.DiffusionPipeline)
    assert run.pipeline.model is run.model
    assert isinstance(run.pipeline.scheduler, DDPMScheduler)  # the training scheduler (the loss)
    sampler = run.scheduler()
    assert isinstance(sampler, DDIMScheduler)
    assert len(sampler.timesteps) == 2
    assert run.scheduler() is not sampler  # fresh each time: set_timesteps state is not shared
    assert run.state.step == 3
    assert (run.sources, run.targets) == (["t1"], ["t2"])


def test_raw_weights_and_overrides(run_dir: Path):
    raw = idm3d.load_run(run_dir, use_ema=False, device="cpu", steps=3, seed=9)
    assert raw.weights == "model"
    state = raw.model.state_dict()
    for name, value in _weights(run_dir, "model/").items():
        assert torch.equal(state[name], value), name
    ema = _weights(run_dir, "ema/")
    assert any(not torch.equal(state[k], ema[k]) for k in ema)
    assert (raw.settings.steps, raw.settings.seed) == (3, 9)
    assert len(raw.scheduler().timesteps) == 3


def test_pipeline_sample_is_what_infer_returns(run_dir: Path):
    """The pieces load_run hands out make the same chain as LoadedRun.infer."""
    run = idm3d.load_run(run_dir, device="cpu")
    condition = torch.linspace(-1, 1, 16**3).reshape(1, 1, 16, 16, 16)
    by_infer = run.infer(condition=condition, seed=4)
    by_hand = run.pipeline.sample((1, 1, 16, 16, 16), condition, scheduler=run.scheduler(),
                                  generator=torch.Generator().manual_seed(4))
    assert torch.equal(by_infer, by_hand)
    assert by_infer.shape == (1, 1, 16, 16, 16)


def test_average_is_the_mean_of_chains_from_separate_seeds(run_dir: Path):
    """``sample.average`` K: the mean of K chains, chain k seeded ``seed + k * AVERAGE_SEED_STRIDE``."""
    from idm3d.runs.load import AVERAGE_SEED_STRIDE

    condition = torch.linspace(-1, 1, 16**3).reshape(1, 1, 16, 16, 16)
    single = idm3d.load_run(run_dir, device="cpu")
    averaged = idm3d.load_run(run_dir, device="cpu", average=3)
    chains = [single.infer(condition=condition, seed=4 + k * AVERAGE_SEED_STRIDE) for k in range(3)]
    mean = averaged.infer(condition=condition, seed=4)
    assert torch.allclose(mean, sum(chains) / 3, atol=1e-6)
    assert not torch.allclose(chains[0], chains[1])  # the chains really differ
    assert torch.equal(idm3d.load_run(run_dir, device="cpu", average=1).infer(condition=condition, seed=4), chains[0])


def test_sample_takes_a_loaded_run(run_dir: Path, tmp_path: Path):
    run = idm3d.load_run(run_dir, device="cpu")
    t1 = Path(run.config.data.root) / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz"
    written = idm3d.sample_to_file(run, tmp_path / "t2.nii.gz", {"t1": t1})
    assert [p.name for p in written] == ["t2.nii.gz", "t2.png"]
    with pytest.raises(ValueError, match=r"^steps: set when loading the run"):
        idm3d.sample_to_file(run, tmp_path / "t2.nii.gz", {"t1": t1}, steps=4)


def test_bad_run_folder_is_one_line(tmp_path: Path):
    with pytest.raises(idm3d.errors.ConfigError, match="not a run folder"):
        idm3d.load_run(tmp_path)


def test_top_level_names_are_lazy():
    code = ("import sys, idm3d; assert 'monai' not in sys.modules and 'idm3d.training' not in sys.modules; "
            "assert callable(idm3d.load_run) and 'idm3d.runs.load' in sys.modules; print(sorted(idm3d.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'load_run'" in done.stdout
