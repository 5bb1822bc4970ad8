"""Depth-sharded training (train.domain_parallel): the same losses and gradients as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from helpers import gloo_group, t1_to_t2, tiny_run_config, torchrun_command, write_brats_folder
from idm3d.errors import ConfigError
from idm3d.runs.checkpoint import list_checkpoints
from idm3d.runs.config import config_from_dict
from idm3d.runs.logs import read_metrics
from idm3d.training import distributed
from idm3d.training.domain_parallel import DomainContext, domain_context
from idm3d.training.trainer import Trainer, train

# Two levels with attention on the bottom one: couplings, resampling and attention all sharded.
TINY_IDM = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, True]}


class GlobalBatch:
    """A deterministic global batch per step, without files."""

    def batch(self, step: int) -> tuple[torch.Tensor, None]:
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(2, 1, 16, 16, 16, generator=g), None


def _config(ranks: int, **train):
    return config_from_dict({
        "data": {"root": None, "targets": ["t1"], "patch_size": [16, 16, 16], "batch_size": 2},
        "model": {"name": "idm", "kwargs": TINY_IDM},
        "diffusion": {"num_train_timesteps": 50},
        "train": {"max_steps": 2, "grad_clip": None, "progress": False, "device": "cpu", "seed": 5,
                  "domain_parallel": ranks, "drift_check_every": 1, **train},
    })


def _steps(trainer: Trainer) -> dict:
    losses, grads = [], []
    for step in range(2):
        losses.append(trainer.train_step(step).loss)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
    return {"losses": losses, "grads": grads, "drift": trainer._drift_check(2)}


def _worker(rank: int, init_file: str, out: str) -> None:
    with gloo_group(init_file, rank, 2):
        trainer = Trainer(_config(2), Path(out) / "run", data=GlobalBatch())
        assert isinstance(trainer.dist, DomainContext)
        assert trainer.net is not trainer.model
        assert trainer._inputs(0)["target"].shape == (2, 1, 8, 16, 16)  # the whole batch, half the depth
        torch.save(_steps(trainer), Path(out) / f"rank{rank}.pt")


def test_two_depth_shards_train_as_one_process(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    single = _steps(Trainer(_config(1), tmp_path / "single", data=GlobalBatch()))
    for r in ranks:
        assert r["losses"] == pytest.approx(single["losses"], rel=1e-5)
        for mine, ref in zip(r["grads"], single["grads"]):
            assert float((mine - ref).norm() / ref.norm()) <= 1e-5
        assert max(r["drift"].values()) <= 1e-4
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["grads"], ranks[1]["grads"]))


def test_domain_parallel_refuses_what_it_cannot_split():
    assert domain_context(distributed.DistContext(), _config(1)) == distributed.DistContext()
    with pytest.raises(ConfigError, match=r"^train.domain_parallel: 2 needs exactly 2 processes"):
        domain_context(distributed.DistContext(), _config(2))
    two = distributed.DistContext(rank=0, world_size=2)
    cfg = _config(2)
    cfg.data.patch.coordinates = True
    with pytest.raises(ConfigError, match=r"^data.patch.coordinates: "):
        domain_context(two, cfg)
    ctx = domain_context(two, _config(2))
    ctx.check_batch(3)  # the batch is not split
    ctx_odd = DomainContext(0, 2, patch_depth=12)
    from idm3d.nets.idm_unet import IDMUNet

    with pytest.raises(ConfigError, match=r"^data.patch_size: the depth 12 .* multiple of 16"):
        ctx_odd.wrap(IDMUNet(channels=4))


@pytest.mark.slow
def test_torchrun_domain_parallel_checkpoints_resumes_and_matches_one_process(tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    options = {"max_steps": 2, "checkpoint_every": 1, "lr": 1e-3, "seed": 3, "device": "cpu"}
    cfg = tiny_run_config(t1_to_t2(root, batch_size=2), options, model_kwargs=TINY_IDM)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    base = [*torchrun_command(), "--standalone", "--nproc_per_node", "2", "-m", "idm3d", "train"]
    done = subprocess.run([*base, "--config", str(cfg_path), "--out", str(run), "--set", "train.domain_parallel=2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    done = subprocess.run([*base, "--out", str(run), "--resume", "--set", "train.max_steps=3"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.set_num_threads(1)
    single = train(config_from_dict({**cfg, "train": {**cfg["train"], "max_steps": 3}}), tmp_path / "single")
    sharded = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert sharded == pytest.approx([r["loss"] for r in read_metrics(single / "metrics.jsonl")], rel=1e-4)
    assert len(sharded) == 3
    # sampling is unchanged for the user: the run loads as any other
    out = tmp_path / "sample.nii.gz"
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    t1 = next(cases[-1].glob("*t1.nii*"))
    sample = subprocess.run([sys.executable, "-m", "idm3d", "sample", "--run", str(run), "--condition", str(t1),
                             "--steps", "2", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert out.is_file()
