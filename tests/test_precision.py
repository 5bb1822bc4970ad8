"""Mixed precision: options, memory-efficient gradients under autocast, fp16 loss scaling, bf16 smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from helpers import tiny_run_config, torch_threads, write_brats_folder
from idm3d.cli.main import main
from idm3d.errors import ConfigError, NonFiniteError
from idm3d.nets.idm_unet import IDMUNet
from idm3d.runs.checkpoint import latest_checkpoint
from idm3d.runs.config import config_from_dict, config_to_dict, load_config
from idm3d.runs.logs import read_metrics
from idm3d.runs.precision import autocast, autocast_dtype, overflow_explained
from idm3d.training.trainer import Trainer

TINY_IDM = {"channels": 8, "levels": 2, "blocks_per_level": 1, "attention_levels": [False, True]}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_brats_folder(tmp_path_factory.mktemp("brats"), n_cases=3, shape=(24, 24, 24), modalities=("t1",))


def _config(root: Path, **train) -> dict:
    train = {"max_steps": 4, "lr": 1e-3, "device": "cpu", "seed": 1, **train}
    return tiny_run_config({"root": str(root), "targets": ["t1"]}, train, model_kwargs=TINY_IDM)


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(("section", "value"), [("train", "bf16"), ("train", "fp16"), ("sample", "bf16")])
def test_precision_option(section: str, value: str):
    cfg = load_config(None, [f"{section}.precision={value}"])
    assert getattr(cfg, section).precision == value
    assert config_from_dict({}).train.precision == "fp32"
    assert autocast_dtype(value) == {"bf16": torch.bfloat16, "fp16": torch.float16}[value]


@pytest.mark.parametrize(("old", "new"), [("none", "fp32"), ("bf16", "bf16")])
def test_train_autocast_is_a_deprecated_alias(old: str, new: str):
    with pytest.warns(FutureWarning, match=f"train.autocast is deprecated; use train.precision={new}"):
        cfg = load_config(None, [f"train.autocast={old}"])
    assert cfg.train.precision == new
    assert "autocast" not in yaml.safe_dump(config_to_dict(cfg)["train"])


@pytest.mark.parametrize(
    ("overrides", "fault"),
    [
        (["train.precision=fp64"], "train.precision: expected one of fp32|bf16|fp16, got 'fp64'"),
        (["sample.precision=half"], "sample.precision: expected one of fp32|bf16|fp16"),
        (["train.autocast=half"], "train.autocast: expected one of none|bf16|fp16, got 'half'"),
        (["train.autocast=bf16", "train.precision=fp16"], "train.autocast: 'bf16' contradicts train.precision='fp16'"),
    ],
)
def test_bad_precision_is_one_line(overrides: list[str], fault: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fault in str(info.value)
    assert "\n" not in str(info.value)


def test_overflow_is_blamed_on_the_scaler_only_above_scale_one():
    scaler = torch.amp.GradScaler("cpu")
    assert overflow_explained(scaler, 2.0)
    assert not overflow_explained(scaler, 1.0)
    assert not overflow_explained(None, 2.0**16)


# ------------------------------------------------------------------------------------------ gradients


def _grads(net: IDMUNet, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor, precision: str,
           memory_efficient: bool) -> torch.Tensor:
    net.memory_efficient = memory_efficient
    net.zero_grad(set_to_none=True)
    with autocast(precision, "cpu"):
        out = net(x, t)
    torch.nn.functional.mse_loss(out.float(), target).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_memory_efficient_gradients_under_autocast_are_as_close_to_fp32_as_plain_autograd(precision: str):
    torch.manual_seed(0)
    net = IDMUNet(**TINY_IDM)
    with torch.no_grad():  # away from the identity start, as after some training
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 16, 16, 16)
    target = torch.randn_like(x)
    t = torch.tensor([10, 700])
    reference = _grads(net, x, t, target, "fp32", memory_efficient=False)

    def error(g: torch.Tensor) -> float:
        return float((g - reference).norm() / reference.norm())

    assert error(_grads(net, x, t, target, "fp32", memory_efficient=True)) < 1e-5
    plain = error(_grads(net, x, t, target, precision, memory_efficient=False))
    efficient = error(_grads(net, x, t, target, precision, memory_efficient=True))
    assert plain > 1e-4  # autocast really ran in low precision
    assert efficient / plain < 1.5, (plain, efficient)


# ------------------------------------------------------------------------------------------ fp16 loss scaling


def test_fp16_training_saves_the_loss_scale_and_resumes_exactly(data_dir: Path, tmp_path: Path):
    with pytest.warns(UserWarning, match="train.precision=fp16 on CPU is slow"):
        full = Trainer(config_from_dict(_config(data_dir, precision="fp16")), tmp_path / "full")
    assert full.scaler is not None
    full.run()
    part = Trainer(config_from_dict(_config(data_dir, precision="fp16", max_steps=2)), tmp_path / "part")
    part.run()
    state = json.loads(latest_checkpoint(tmp_path / "part" / "checkpoints").read_text())
    assert state["precision"] == "fp16"
    assert state["grad_scaler"]["scale"] == part.scaler.get_scale()
    assert state["grad_scaler"]["_growth_tracker"] == 2
    resumed = Trainer(config_from_dict(_config(data_dir, precision="fp16")), tmp_path / "part", resume=True)
    assert resumed.scaler.state_dict() == part.scaler.state_dict()
    resumed.run()

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]

    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert all(np.isfinite(losses(tmp_path / "full")))


def test_fp16_overflow_skips_lower_the_scale_without_stopping_training(data_dir: Path, tmp_path: Path):
    trainer = Trainer(config_from_dict(_config(data_dir, precision="fp16", max_steps=16, nonfinite_patience=2,
                                               checkpoint_every=100)), tmp_path / "run")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**26)  # overflows fp16 gradients at first
    trainer.run()  # more overflow skips in a row than nonfinite_patience, yet no NonFiniteError
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    overflowed = [r["step"] for r in records if r.get("overflow")]
    assert overflowed[:3] == [1, 2, 3]
    assert all(bool(r.get("skipped")) == bool(r.get("overflow")) for r in records)
    assert len(overflowed) < 12  # then it trains
    assert trainer.step == 16
    assert trainer.skipped_total == len(overflowed)
    assert trainer.scaler.get_scale() == 2.0 ** (26 - len(overflowed))


def test_fp16_scaler_does_not_hide_a_persistent_nan(data_dir: Path, tmp_path: Path):
    trainer = Trainer(config_from_dict(_config(data_dir, precision="fp16", max_steps=60, nonfinite_patience=2,
                                               checkpoint_every=100)), tmp_path / "run")
    weight = trainer.model.get_parameter("core.ops.0.module.net.conv1.weight")
    weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteError, match=r"2 steps in a row .*non-finite gradient first in module core\.ops\.0"):
        trainer.run()
    # 16 halvings from 2**16 (blamed on the scale), then 2 steps at scale <= 1 exhaust the patience.
    assert trainer.step == 18
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sum(bool(r.get("overflow")) for r in records) == 16
    assert all(r.get("skipped") for r in records)


# ------------------------------------------------------------------------------------------ bf16 smoke run, sampling


def test_bf16_training_200_steps_on_cpu_stays_finite_and_samples(data_dir: Path, tmp_path: Path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(data_dir, max_steps=200, checkpoint_every=100, log_every=1)))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run), "--precision", "bf16"]) == 0
    assert load_config(run / "config.yaml").train.precision == "bf16"
    state = json.loads(latest_checkpoint(run / "checkpoints").read_text())
    assert (state["step"], state["precision"], state["grad_scaler"], state["skipped_total"]) == (200, "bf16", None, 0)
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 200
    assert all(np.isfinite(losses))
    assert np.mean(losses[-50:]) < 0.9 * np.mean(losses[:10])  # it learns

    volumes = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.nii.gz"
        assert main(["sample", "--run", str(run), "--out", str(out), "--shape", "16", "16", "16", "--device", "cpu",
                     "--precision", precision, "--no-progress"]) == 0
        volumes[precision] = np.asarray(nib.load(str(out)).dataobj, dtype=np.float64)
    assert all(np.isfinite(v).all() for v in volumes.values())
    gap = np.abs(volumes["bf16"] - volumes["fp32"]).max() / np.abs(volumes["fp32"]).max()
    assert 0 < gap < 0.2
