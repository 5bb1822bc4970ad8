"""Data-parallel training (DDP, gloo on CPU): gradient equality with one process, and torchrun runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from helpers import gloo_group, t1_to_t2, tiny_run_config, torchrun_command, write_brats_folder
from idm3d.cli.main import build_parser, main
from idm3d.errors import ConfigError, NonFiniteError
from idm3d.runs.checkpoint import list_checkpoints
from idm3d.runs.config import config_from_dict
from idm3d.runs.logs import read_metrics
from idm3d.runs.tensorboard import tensorboard_available
from idm3d.training import distributed
from idm3d.training.trainer import Trainer, train

# Two levels with attention on the bottom one: couplings, resampling and attention all in the core.
TINY_IDM = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, True],
            "memory_efficient": True}


class GlobalBatch:
    """A deterministic global batch per step (what PatchData yields), without files."""

    def __init__(self, size: int, edge: int = 16) -> None:
        self.size, self.edge = size, edge

    def batch(self, step: int) -> tuple[torch.Tensor, None]:
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(self.size, 1, self.edge, self.edge, self.edge, generator=g), None


# A rectified-flow run with the options that draw per-sample values (logit-normal times, the size warp).
FLOW = {"kind": "rflow", "num_train_timesteps": 50, "sample_method": "logit-normal", "use_timestep_transform": True}


def _config(batch: int, diffusion: dict | None = None, **train):
    return config_from_dict({
        "data": {"root": None, "targets": ["t1"], "patch_size": [16, 16, 16], "batch_size": batch},
        "model": {"name": "idm", "kwargs": TINY_IDM},
        "diffusion": diffusion or {"num_train_timesteps": 50},
        "train": {"max_steps": 1, "grad_clip": None, "progress": False, "device": "cpu", "seed": 5, **train},
    })


def _grads(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters()])


def _step_worker(rank: int, world: int, init_file: str, out: str) -> None:
    with gloo_group(init_file, rank, world):
        trainer = Trainer(_config(4), Path(out) / "run", data=GlobalBatch(4))
        assert isinstance(trainer.net, torch.nn.parallel.DistributedDataParallel)
        counts: dict[str, int] = {}
        for name, p in trainer.model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda _p, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
        result = trainer.train_step(0)
        torch.save({"grads": _grads(trainer), "loss": result.loss, "counts": counts,
                    "local_batch": trainer._inputs(0)["target"].shape[0]}, Path(out) / f"rank{rank}.pt")
        # NaN on one process only, from the second step on: both skip together, both stop with the diagnosis.
        cfg = _config(4, max_steps=5, nonfinite_patience=2, log_every=1)
        nan = Trainer(cfg, Path(out) / "nan", data=GlobalBatch(4))
        nan.model.stem.register_forward_hook(lambda m, i, o: o * float("nan") if rank == 1 and nan.step >= 1 else o)
        try:
            nan.run()
            message = "no error"
        except NonFiniteError as err:
            message = str(err)
        (Path(out) / f"nan{rank}.txt").write_text(f"{nan.step} {nan.skipped_total}\n{message}")


def _flow_worker(rank: int, init_file: str, out: str) -> None:
    with gloo_group(init_file, rank, 2):
        trainer = Trainer(_config(4, FLOW), Path(out) / "run", data=GlobalBatch(4))
        result = trainer.train_step(0)
        torch.save({"grads": _grads(trainer), "loss": result.loss}, Path(out) / f"flow{rank}.pt")


def test_two_ranks_train_a_flow_run_as_one_process_on_the_combined_batch(tmp_path: Path):
    mp.spawn(_flow_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    single = Trainer(_config(4, FLOW), tmp_path / "single", data=GlobalBatch(4))
    result = single.train_step(0)
    reference = _grads(single)
    for r in (torch.load(tmp_path / f"flow{r}.pt", weights_only=True) for r in (0, 1)):
        # each process draws its half of the global batch's times and noise, as one process draws them
        assert r["loss"] == pytest.approx(result.loss, rel=1e-5)
        assert float((r["grads"] - reference).norm() / reference.norm()) <= 1e-5


def test_two_ranks_give_the_gradient_of_one_process_on_the_combined_batch(tmp_path: Path):
    mp.spawn(_step_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    single = Trainer(_config(4), tmp_path / "single", data=GlobalBatch(4))
    assert single.net is single.model
    assert single.model.memory_efficient
    result = single.train_step(0)
    reference = _grads(single)
    n_params = sum(1 for _ in single.model.parameters())
    for r in ranks:
        assert r["local_batch"] == 2
        # Every parameter's gradient accumulated (and so all-reduced) exactly once.
        assert len(r["counts"]) == n_params
        assert set(r["counts"].values()) == {1}
        assert float((r["grads"] - reference).norm() / reference.norm()) <= 1e-5
        assert r["loss"] == pytest.approx(result.loss, rel=1e-5)
    assert torch.equal(ranks[0]["grads"], ranks[1]["grads"])
    for r in (0, 1):
        counters, message = (tmp_path / f"nan{r}.txt").read_text().split("\n", 1)
        assert counters == "3 2"  # steps 2 and 3 skipped on both processes, stopped at the patience
        assert "2 steps in a row" in message
        assert "process 1: first non-finite output from module stem" in message
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [(rec["step"], bool(rec.get("skipped"))) for rec in records] == [(1, False), (2, True), (3, True)]


def test_context_shards_and_checks_the_global_batch():
    ctx = distributed.DistContext(rank=1, world_size=2)
    x = torch.arange(6)
    assert ctx.shard(x).tolist() == [3, 4, 5]
    assert distributed.DistContext(rank=0, world_size=2).shard(x).tolist() == [0, 1, 2]
    assert ctx.shard(None) is None
    with pytest.raises(ConfigError, match=r"^data.batch_size: .* multiple of 2, got 3"):
        ctx.check_batch(3)
    single = distributed.DistContext()
    assert single.shard(x) is x
    assert single.mean(2.5) == 2.5
    assert single.max([1.0, 2.0]) == [1.0, 2.0]
    assert single.agree(False) is False


def test_setup_without_torchrun_is_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    assert ctx.device == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.setup("cpu")


def test_nproc_reruns_the_same_command_through_torchrun():
    args = build_parser().parse_args(["--debug", "train", "--config", "c.yaml", "--set", "train.max_steps=3",
                                      "--out", "runs/x", "--resume", "--precision", "bf16", "--nproc", "2"])
    from idm3d.cli.train import _relaunch_argv

    argv = distributed.launcher_argv(args.nproc, _relaunch_argv(args))
    assert argv[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    assert argv[6:] == ["idm3d", "--debug", "train", "--config", "c.yaml", "--set", "train.max_steps=3",
                        "--out", "runs/x", "--resume", "--precision", "bf16"]
    assert build_parser().parse_args(argv[7:]).nproc is None
    with pytest.raises(ConfigError, match="--nproc"):
        distributed.launcher_argv(0, ["train"])


@pytest.mark.slow
def test_torchrun_two_processes_rank0_writes_and_resume_matches_one_process(tmp_path: Path, capfd):
    root = write_brats_folder(tmp_path / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    options = {"max_steps": 2, "checkpoint_every": 1, "lr": 1e-3, "seed": 3, "device": "cpu", "progress": True}
    cfg = tiny_run_config(t1_to_t2(root, batch_size=2), options, model_kwargs=TINY_IDM)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([*torchrun_command(), "--standalone", "--nproc_per_node", "2", "-m", "idm3d", "train",
                           "--config", str(cfg_path), "--out", str(run)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1
    # One progress bar (rank 0's): two processes would each start one at 0/2.
    assert done.stderr.count("0/2 [") == 1, done.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    names = {p.name for p in run.iterdir()}
    events = {n for n in names if n.startswith("events.out.tfevents.")}
    assert len(events) == (1 if tensorboard_available() else 0)  # rank 0's TensorBoard log only
    assert names - events == {
        "checkpoints", "config.yaml", "run.json", "model.json", "split.json", "data.json", "metrics.jsonl", "loss.png"}
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    state = json.loads((run / "checkpoints" / "step-00000002.json").read_text())
    assert state["world_size"] == 2

    # Resume with both processes through `idm3d train --nproc 2` (same data order from step 2 on).
    capfd.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--set", "train.max_steps=3", "--nproc", "2"]) == 0
    out, err = capfd.readouterr()
    assert out.count("run folder:") == 1
    assert err.count("resuming from step-00000002.json at step 2") == 1
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]

    # One process on the same global batches gives the same losses (the gradient of the global mean).
    torch.set_num_threads(1)
    single_cfg = {**cfg, "train": {**cfg["train"], "max_steps": 3, "progress": False}}
    single = train(config_from_dict(single_cfg), tmp_path / "single")
    ddp_losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    one_losses = [r["loss"] for r in read_metrics(single / "metrics.jsonl")]
    assert ddp_losses == pytest.approx(one_losses, rel=1e-4)
    shutil.rmtree(tmp_path / "data")
