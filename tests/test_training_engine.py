"""The training engine on a tiny BraTS-layout folder: steps, resume, non-finite guard, drift guard, data checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_IDM, t1_to_t2, tiny_run_config, torch_threads, write_brats_folder
from idm3d.errors import DataError, IDM3DError, NonFiniteError
from idm3d.runs.checkpoint import latest_checkpoint, list_checkpoints
from idm3d.runs.config import Config, config_from_dict
from idm3d.runs.logs import read_metrics
from idm3d.training.trainer import Trainer, train


def tiny_config(root: Path | None, **sections) -> Config:
    """A translation t1 -> t2 run small enough for a CPU test (16^3 patches, 8 channels, T=50)."""
    options = {"max_steps": 4, "keep_checkpoints": 3, "lr": 1e-3, "seed": 3}
    base = tiny_run_config(t1_to_t2(root, batch_size=1), options, {"steps": 3})
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return config_from_dict(base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_brats_folder(tmp_path_factory.mktemp("brats"), n_cases=3, shape=(24, 24, 24),
                              modalities=("t1", "t2"))


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if not r.get("skipped")}


def test_training_writes_checkpoints_metrics_and_curve(data_dir: Path, tmp_path: Path):
    run = train(tiny_config(data_dir, train={"max_steps": 3}), tmp_path / "run")
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 3]
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3]
    assert all(0 < v < 10 for v in losses.values())
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()
    assert (run / "split.json").is_file()
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 2
    assert len(split["test"]) == 1
    state = json.loads(latest_checkpoint(run / "checkpoints").read_text())
    assert state["step"] == 3
    assert state["seed"] == 3
    assert state["config"]["model"]["kwargs"] == TINY_IDM
    tensors = load_file(str(latest_checkpoint(run / "checkpoints").with_suffix(".safetensors")))
    prefixes = {k.split("/", 1)[0] for k in tensors}
    assert prefixes == {"model", "ema", "optim"}
    record = read_metrics(run / "metrics.jsonl")[-1]
    assert record["mem_mb"] > 0
    assert record["steps_per_s"] > 0


def test_resume_continues_with_identical_losses(data_dir: Path, tmp_path: Path):
    full = train(tiny_config(data_dir, train={"max_steps": 5}), tmp_path / "full")
    part = train(tiny_config(data_dir, train={"max_steps": 2}), tmp_path / "part")
    assert _losses(part) == {k: v for k, v in _losses(full).items() if k <= 2}
    # Leftovers of a crash while writing step 4: a torn temp file and weights whose JSON never came.
    ckpts = part / "checkpoints"
    (ckpts / ".step-00000004.safetensors.tmp-999").write_bytes(b"partial")
    (ckpts / "step-00000004.safetensors").write_bytes(b"not committed")
    trainer = Trainer(tiny_config(data_dir, train={"max_steps": 5}), part, resume=True)
    assert trainer.step == 2
    assert (ckpts / ".step-00000004.safetensors.tmp-999").exists()  # building a Trainer writes nothing
    trainer.run()
    assert not (ckpts / ".step-00000004.safetensors.tmp-999").exists()  # run() cleans up first
    assert _losses(part) == _losses(full)
    a = load_file(str(latest_checkpoint(full / "checkpoints").with_suffix(".safetensors")))
    b = load_file(str(latest_checkpoint(part / "checkpoints").with_suffix(".safetensors")))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(data_dir: Path, tmp_path: Path):
    run = train(tiny_config(data_dir, train={"max_steps": 1}), tmp_path / "run")
    with pytest.raises(IDM3DError, match="--resume"):
        train(tiny_config(data_dir), run)
    with pytest.raises(IDM3DError, match="no complete checkpoint"):
        train(tiny_config(data_dir), tmp_path / "empty", resume=True)
    with pytest.raises(IDM3DError, match=r"^train.seed"):
        train(tiny_config(data_dir, train={"seed": 4}), run, resume=True)


def _nan_hook(active):
    def hook(module, inputs, output):
        if not active():
            return output
        if isinstance(output, tuple):
            return (output[0] * float("nan"), *output[1:])
        return output * float("nan")

    return hook


def test_nonfinite_step_is_skipped_and_training_goes_on(data_dir: Path, tmp_path: Path):
    trainer = Trainer(tiny_config(data_dir, train={"max_steps": 4, "nonfinite_patience": 2}), tmp_path / "run")
    trainer.model.stem.register_forward_hook(_nan_hook(lambda: trainer.step == 1))
    seen = {}
    trainer.on_step.append(lambda t, r: seen.update({t.step: (r.skipped, [p.detach().clone()
                                                                            for p in t.model.parameters()])}))
    trainer.run()
    assert [seen[s][0] for s in (1, 2, 3, 4)] == [False, True, False, False]
    # The skipped step left every weight as it was.
    assert all(torch.equal(a, b) for a, b in zip(seen[1][1], seen[2][1]))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [2]
    assert trainer.skipped_total == 1
    state = json.loads(latest_checkpoint(tmp_path / "run" / "checkpoints").read_text())
    assert state["step"] == 4
    assert state["skipped_total"] == 1


def test_nonfinite_k_in_a_row_stops_naming_the_module(data_dir: Path, tmp_path: Path):
    cfg = tiny_config(data_dir, train={"max_steps": 10, "nonfinite_patience": 3, "checkpoint_every": 1})
    trainer = Trainer(cfg, tmp_path / "run")
    target = trainer.model.core.ops[0].module  # the first coupling of the invertible core
    target.register_forward_hook(_nan_hook(lambda: trainer.step >= 2))
    with pytest.raises(NonFiniteError) as info:
        trainer.run()
    message = str(info.value)
    assert "3 steps in a row" in message
    assert "module core.ops.0.module (AdditiveCoupling)" in message
    assert "\n" not in message
    # Steps 3..5 were skipped: checkpoints after step 2 hold step 2's weights, and none holds NaN.
    found = {s: load_file(str(m.with_suffix(".safetensors"))) for s, m in list_checkpoints(trainer.ckpt_dir)}
    assert sorted(found) == [2, 3, 4]
    for tensors in found.values():
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
        assert all(torch.equal(tensors[k], found[2][k]) for k in tensors if k.startswith("model/"))


def test_nonfinite_gradient_with_finite_forward_is_diagnosed(data_dir: Path, tmp_path: Path):
    trainer = Trainer(tiny_config(data_dir, train={"max_steps": 10, "nonfinite_patience": 2}), tmp_path / "run")
    weight = trainer.model.get_parameter("core.ops.0.module.net.conv1.weight")
    weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteError, match=r"forward is finite; non-finite gradient first in module "
                                             r"core\.ops\.0\.module\.net\.conv1 "):
        trainer.run()
    assert trainer.step == 2


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_drift_guard_calls_reconstruction_error(data_dir: Path, tmp_path: Path, action: str, capsys):
    cfg = tiny_config(data_dir, train={"max_steps": 2, "drift_check_every": 1, "drift_threshold": 1e-30,
                                       "drift_action": action})
    trainer = Trainer(cfg, tmp_path / "run")
    calls = []
    original = trainer.model.reconstruction_error

    def spy(x, t, context=None):
        calls.append(tuple(x.shape))
        errors = original(x, t, context)
        return {**errors, "down0.coupling0": 1e-3}

    trainer.model.reconstruction_error = spy
    if action == "stop":
        with pytest.raises(IDM3DError, match=r"segment down0.coupling0 .* 0.001 > train.drift_threshold"):
            trainer.run()
        assert len(calls) == 1
    else:
        trainer.run()
        assert len(calls) == 2
        assert "reconstruction drift" in capsys.readouterr().err
        assert all(r["drift_max"] >= 1e-3 for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert calls[0] == (1, 2, 16, 16, 16)  # noisy target + source, as in training


def test_training_refuses_bad_data_with_the_list_of_problems(tmp_path: Path):
    root = write_brats_folder(tmp_path / "bad", n_cases=3, shape=(24, 24, 24), modalities=("t1", "t2"))
    (root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz").unlink()
    victim = root / "BraTS20_Training_003" / "BraTS20_Training_003_t1.nii.gz"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError) as info:
        train(tiny_config(root), tmp_path / "run")
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "BraTS20_Training_002" in message
    assert "BraTS20_Training_003_t1.nii.gz" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_time_budget_stops_training(data_dir: Path, tmp_path: Path):
    run = train(tiny_config(data_dir, train={"max_steps": None, "max_seconds": 0.5, "checkpoint_every": 1000}),
                tmp_path / "run")
    state = json.loads(latest_checkpoint(run / "checkpoints").read_text())
    assert state["step"] >= 1
    assert 0.5 <= state["elapsed_s"] < 10


def test_cpu_time_budget_stops_training_and_resumes_from_what_was_used(data_dir: Path, tmp_path: Path):
    cfg = tiny_config(data_dir, train={"max_steps": None, "max_cpu_seconds": 0.5, "checkpoint_every": 1000})
    run = train(cfg, tmp_path / "run")
    state = json.loads(latest_checkpoint(run / "checkpoints").read_text())
    assert state["step"] >= 1
    # the budget is this process's CPU time: at least what was asked, not far more (one step is < 1 s here)
    assert 0.5 <= state["cpu_s"] < 5
    assert state["elapsed_s"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["cpu_s"] == pytest.approx(state["cpu_s"])
    # resuming with a larger budget continues from the CPU time already used
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_cpu_seconds=1.0))
    train(more, run, resume=True)
    resumed = json.loads(latest_checkpoint(run / "checkpoints").read_text())
    assert resumed["step"] > state["step"]
    assert 1.0 <= resumed["cpu_s"] < 6


def test_monai_model_and_bf16_autocast_and_sample_prediction(data_dir: Path, tmp_path: Path):
    cfg = tiny_config(
        data_dir,
        model={"name": "monai", "kwargs": {"channels": [8, 8], "num_res_blocks": 1, "attention_levels": [False, False],
                                           "norm_num_groups": 4}},
        diffusion={"prediction_type": "sample", "schedule": "cosine"},
        train={"max_steps": 2, "precision": "bf16"},
    )
    run = train(cfg, tmp_path / "run")
    assert len(_losses(run)) == 2
    assert all(v == v for v in _losses(run).values())
