"""Depth-sharded sampling (``idm3d sample --domain-parallel R``): the same volume and file as one process."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import gloo_group, perturb, tiny_run_config, torch_threads, write_brats_folder
from idm3d.cli.main import main
from idm3d.diffusion.pipeline import DiffusionPipeline
from idm3d.errors import ConfigError
from idm3d.inference.domain_sample import DepthShardedPipeline, check_domain_depth, shard_run
from idm3d.nets.idm_unet import IDMUNet
from idm3d.runs.config import config_from_dict, load_config
from idm3d.runs.load import build_scheduler, load_run
from idm3d.training.trainer import train

# Two levels with attention on the bottom one: halo convolutions, sharded GroupNorms and attention all run.
TINY_IDM = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, True]}
SHAPE = (1, 1, 16, 16, 8)  # the pipeline-level chains: a depth of 16 over 2 ranks


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a held-out t1 file, the run folder) of a one-step t1 -> t2 run sampled with 3 stochastic DDPM steps."""
    base = tmp_path_factory.mktemp("dsample")
    root = write_brats_folder(base / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    cfg = tiny_run_config({"root": str(root), "task": "translate", "sources": ["t1"], "targets": ["t2"]},
                          train={"max_steps": 1, "checkpoint_every": 1}, sample={"sampler": "ddpm", "steps": 3})
    cfg["model"]["kwargs"] = TINY_IDM
    with torch_threads(1):
        run = train(config_from_dict(cfg), base / "run")
    case = sorted(p for p in root.iterdir() if p.is_dir())[-1]
    return next(case.glob("*t1.nii.gz")), run


def _chains() -> dict[str, tuple[DiffusionPipeline, object, float, torch.Tensor | None]]:
    """Pipeline-level chains the run does not cover: a flow run's Heun (with the size-dependent time warp,
    a condition, spatial attention) and DDIM with eta > 0 (noise drawn in every step)."""
    torch.manual_seed(0)
    flow_net = perturb(IDMUNet(in_channels=2, attention="spatial", **TINY_IDM), seed=1)
    ddim_net = perturb(IDMUNet(**TINY_IDM), seed=2)
    flow = load_config(None, ["diffusion.kind=rflow", "diffusion.num_train_timesteps=100",
                              "diffusion.use_timestep_transform=true", "diffusion.base_img_size_numel=64"])
    ddpm = load_config(None, ["diffusion.num_train_timesteps=50"])
    condition = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    return {
        "flow_heun": (DiffusionPipeline(flow_net.eval(), build_scheduler(flow)), build_scheduler(flow, "heun", 3),
                      0.0, condition),
        "ddim_eta": (DiffusionPipeline(ddim_net.eval(), build_scheduler(ddpm)), build_scheduler(ddpm, "ddim", 3),
                     0.7, None),
    }


def _draw(pipeline: DiffusionPipeline, scheduler: object, eta: float, condition: torch.Tensor | None) -> torch.Tensor:
    return pipeline.sample(SHAPE, condition, scheduler=scheduler, generator=torch.Generator().manual_seed(7), eta=eta)


def _worker(rank: int, init_file: str, run: str, t1: str, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))  # what torchrun sets
    with gloo_group(init_file, rank, 2):
        code = main(["sample", run, "--condition", t1, "--out", str(Path(out) / "sharded.nii.gz"), "--no-progress",
                     "--domain-parallel", "2"])
        results = {"code": torch.tensor(code)}
        for name, (pipeline, scheduler, eta, condition) in _chains().items():
            results[name] = _draw(DepthShardedPipeline(pipeline), scheduler, eta, condition)
        try:  # every rank refuses a depth its shards cannot split, before any collective
            DepthShardedPipeline(_chains()["ddim_eta"][0]).sample((1, 1, 10, 16, 16), generator=torch.Generator())
        except ConfigError as err:
            results["bad_depth"] = torch.tensor(list(str(err).encode()))
        torch.save(results, Path(out) / f"rank{rank}.pt")


def test_two_ranks_sample_the_file_one_process_writes(ddpm_run, tmp_path: Path):
    t1, run = ddpm_run
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(run), str(t1), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    with torch_threads(1):
        assert main(["sample", "--run", str(run), "--condition", str(t1), "--out", str(tmp_path / "single.nii.gz"),
                     "--no-progress"]) == 0
        chains = {name: _draw(*chain) for name, chain in _chains().items()}
    assert [int(r["code"]) for r in ranks] == [0, 0]
    single, sharded = nib.load(tmp_path / "single.nii.gz"), nib.load(tmp_path / "sharded.nii.gz")
    assert sharded.shape == single.shape == (24, 24, 24)  # the condition's original grid
    np.testing.assert_array_equal(sharded.affine, single.affine)
    assert sharded.header.binaryblock == single.header.binaryblock
    want, got = np.asarray(single.dataobj), np.asarray(sharded.dataobj)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert (tmp_path / "sharded.png").is_file()
    for name, want in chains.items():
        scale = float(want.abs().max())
        for r in ranks:  # the whole volume on every rank
            assert float((r[name] - want).abs().max()) <= 1e-5 * scale, name
    for r in ranks:
        message = bytes(r["bad_depth"].tolist()).decode()
        assert message.startswith("--domain-parallel 2: the volume's depth 10 (its first axis) must be a multiple of 4")
        assert "\n" not in message


def test_bad_launches_are_one_line(ddpm_run, tmp_path: Path, monkeypatch, capsys):
    t1, run = ddpm_run
    base = ["sample", str(run), "--condition", str(t1), "--out", str(tmp_path / "x.nii.gz"), "--domain-parallel"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cases = [
        ([*base, "2"], None, "--domain-parallel 2: not launched by torchrun; run torchrun --nproc_per_node 2 "),
        ([*base, "2"], "3", "--domain-parallel 2: needs exactly 2 processes (torchrun --nproc_per_node 2), got "
                            "WORLD_SIZE=3"),
        ([*base, "0"], None, "--domain-parallel: expected an integer >= 1, got 0"),
        (["sample", "--run", str(run), "--num", "2", "--out", str(tmp_path), "--domain-parallel", "2"], "2",
         "--domain-parallel: samples one volume; drop --input-dir/--num"),
        (["sample", str(run), "--run", str(run), "--out", str(tmp_path / "x.nii.gz")], None,
         "--run: give the run folder once, as RUN or as --run RUN"),
    ]
    for argv, world, message in cases:
        if world is not None:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"idm3d: error: {message}"), err
        assert err.count("\n") == 1, err
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"^--domain-parallel 4: the volume's depth 24 .* multiple of 32 "):
        check_domain_depth(24, 4, 8)
    check_domain_depth(32, 4, 8)
    with pytest.raises(ConfigError, match=r"^--domain-parallel: no process group; run under torchrun"):
        shard_run(load_run(run, device="cpu"))
