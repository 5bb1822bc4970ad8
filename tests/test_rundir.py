"""RunDir and TrainState: one checkpoint schema, strict JSON, and run folders of older versions still loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from idm3d.data.split import split_cases
from idm3d.errors import CheckpointError, DataError
from idm3d.runs.checkpoint import TrainState, optimizer_to_flat, save_checkpoint
from idm3d.runs.config import config_from_dict, config_to_dict
from idm3d.runs.load import load_run
from idm3d.runs.rundir import RunDir
from idm3d.training.trainer import Trainer

TINY_IDM = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, False]}


class Batches:
    """A deterministic batch per step, without files."""

    def batch(self, step: int) -> tuple[torch.Tensor, None]:
        return torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(step)), None


def _config(**train):
    return config_from_dict({
        "data": {"root": None, "targets": ["t1"], "patch_size": [8, 8, 8]},
        "model": {"name": "idm", "kwargs": TINY_IDM},
        "diffusion": {"num_train_timesteps": 20},
        "train": {"max_steps": 3, "progress": False, "device": "cpu", "seed": 7, **train},
        "sample": {"steps": 2},
    })


# What `Trainer.save` wrote before TrainState existed (idm3d 0.1.0, commit a518f81), field for field; the
# oldest runs also lacked the fields added with mixed precision and DDP.
_LATER_FIELDS = ("precision", "grad_scaler", "world_size", "versions", "last_loss")


def _write_old_run(folder: Path, trainer: Trainer, *, oldest: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(trainer.cfg), sort_keys=False))
    (folder / "run.json").write_text(json.dumps({"signature": trainer.signature, "versions": {"idm3d": "0.1.0"}}))
    opt_tensors, opt_meta = optimizer_to_flat(trainer.optimizer)
    tensors = {f"model/{k}": v for k, v in trainer.model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in trainer.ema.state_dict().items()})
    tensors.update(opt_tensors)
    state = {
        "seed": trainer.cfg.train.seed,
        "rng": "per-step generators seeded from (seed, step); no RNG state carried",
        "config": config_to_dict(trainer.cfg),
        "signature": trainer.signature,
        "optimizer": opt_meta,
        "ema_updates": trainer.ema.num_updates,
        "elapsed_s": 1.5,
        "skipped_total": 0,
        "precision": "fp32",
        "grad_scaler": None,
        "world_size": 1,
        "last_loss": 0.25,
        "versions": {"idm3d": "0.1.0", "torch": "2.13.0"},
    }
    if oldest:
        state = {k: v for k, v in state.items() if k not in _LATER_FIELDS}
    save_checkpoint(folder / "checkpoints", trainer.step, tensors, state)


@pytest.mark.parametrize("oldest", [False, True])
def test_a_run_folder_of_an_older_version_loads_samples_and_resumes(tmp_path: Path, oldest: bool):
    reference = Trainer(_config(), tmp_path / "ref", data=Batches())
    for step in range(2):
        reference.train_step(step)
        reference.step = step + 1
    old = tmp_path / "old"
    _write_old_run(old, reference, oldest=oldest)

    state = RunDir(old).read_state()
    assert (state.step, state.seed, state.ema_updates) == (2, 7, 2)
    assert state.precision == "fp32"
    assert state.world_size == 1
    assert state.last_loss == (None if oldest else 0.25)

    run = load_run(old, device="cpu")
    assert run.weights == "ema"
    ema = reference.ema.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in run.model.state_dict().items())
    volume = run.infer(shape=(8, 8, 8))
    assert volume.shape == (1, 1, 8, 8, 8)
    assert bool(torch.isfinite(volume).all())

    resumed = Trainer(_config(), old, resume=True, data=Batches())
    assert resumed.step == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), reference.model.parameters()))
    resumed.run()
    assert RunDir(old).read_state().step == 3


def test_train_state_round_trips_and_ignores_fields_it_does_not_know(tmp_path: Path):
    state = TrainState(step=4, seed=1, config={"a": 1}, last_loss=float("nan"), precision="bf16")
    doc = state.to_json()
    assert doc["last_loss"] is None  # strict JSON
    json.dumps(doc, allow_nan=False)
    back = TrainState.from_json({**doc, "weights_file": "x.safetensors", "weights_sha256": "0", "format": "v1",
                                 "a_field_from_the_future": 3})
    assert back == TrainState(step=4, seed=1, config={"a": 1}, last_loss=None, precision="bf16")
    with pytest.raises(CheckpointError, match="field 'ema_updates': expected int"):
        TrainState.from_json({"step": 1, "ema_updates": "many"}, tmp_path / "step-00000001.json")


def test_run_dir_reads_back_what_it_writes(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    assert not run.path.exists()  # nothing is created until something is written
    assert run.read_split() is None
    assert run.read_data_info() is None
    split = split_cases([f"c{i}" for i in range(5)], (0.6, 0.2, 0.2), seed=3)
    run.write_split(split)
    assert run.read_split() == split
    info = {"scalings": {"t1": {"lo": 0.0, "hi": 1.0}}, "grid_shape": [8, 8, 8], "psnr": math.inf}
    run.write_data_info(info)
    assert run.read_data_info() == {**info, "psnr": None}  # one JSON rule: non-finite -> null
    run.write_config(_config(), {"digest": "x"})
    assert run.read_config() == _config()
    (run.path / "data.json").write_text(json.dumps({"scalings": {"t1": {"lo": "a"}}}))
    with pytest.raises(DataError, match=r"data\.json: 'scalings'"):
        run.read_data_info()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run.read_state()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "data.json", "run.json", "split.json"]
