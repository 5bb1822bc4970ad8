"""A model that describes itself: ``model.json`` and the checkpoint metadata rebuild the network alone
(``idm3d.build_model_from_record``, ``idm3d.load_run``, ``idm3d.load_pipeline``); old runs still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import idm3d
from helpers import TINY_IDM, train_tiny_run
from idm3d.errors import CheckpointError
from idm3d.runs import atomic
from idm3d.runs import checkpoint as ckpt
from idm3d.runs.config import ModelConfig
from idm3d.runs.model_factory import MODEL_FORMAT, build_model, model_record


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("record")
    return train_tiny_run(base, {"max_steps": 2, "log": {"tensorboard": False}})


def _weights(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002.safetensors"


def _metadata_record(weights: Path) -> dict:
    with safe_open(str(weights), framework="pt") as fh:
        return json.loads(fh.metadata()[ckpt.MODEL_METADATA_KEY])


def _fixed_output(net: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 16, 16, 16, generator=gen)
    with torch.no_grad():
        return net.eval()(x, torch.tensor([7]))


def test_model_json_holds_the_registry_name_and_every_constructor_argument(run_dir: Path):
    record = json.loads((run_dir / "model.json").read_text())
    assert record["format"] == MODEL_FORMAT
    assert record["name"] == "idm"
    assert record["class"] == "IDMUNet"
    kwargs = record["kwargs"]
    assert {"spatial_dims": 3, "in_channels": 2, "out_channels": 1}.items() <= kwargs.items()
    assert {k: kwargs[k] for k in TINY_IDM} == TINY_IDM
    assert kwargs["resample"] == "cayley"
    assert kwargs["down_fraction"] == 0.25
    run = idm3d.load_run(run_dir, device="cpu")
    assert run.model.config == kwargs  # the network's own record of its constructor arguments


def test_checkpoint_metadata_equals_model_json(run_dir: Path):
    assert _metadata_record(_weights(run_dir)) == json.loads((run_dir / "model.json").read_text())


def test_rebuilt_from_model_json_alone_is_bit_identical(run_dir: Path, tmp_path: Path):
    record = json.loads((run_dir / "model.json").read_text())
    net = idm3d.build_model_from_record(record)
    tensors = load_file(str(_weights(run_dir)))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}, strict=True)
    loaded = idm3d.load_run(run_dir, device="cpu")
    assert list(net.state_dict()) == list(loaded.model.state_dict())
    assert torch.equal(_fixed_output(net), _fixed_output(loaded.model))


def test_load_run_needs_no_data_section_when_the_run_has_a_model_record(run_dir: Path, tmp_path: Path):
    """The config's channel information is gone (a source and a target added): the record still rebuilds."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "model.json").unlink()  # the checkpoint's metadata alone
    cfg = (copy / "config.yaml").read_text()
    cfg = cfg.replace("sources:\n  - t1\n", "sources:\n  - t1\n  - flair\n").replace("targets:\n  - t2\n",
                                                                                     "targets:\n  - t2\n  - t1ce\n")
    (copy / "config.yaml").write_text(cfg)
    run = idm3d.load_run(copy, device="cpu")
    assert run.model.in_channels == 2
    assert run.model.out_channels == 1
    ref = idm3d.load_run(run_dir, device="cpu")
    assert torch.equal(_fixed_output(run.model), _fixed_output(ref.model))


def test_load_pipeline_is_the_ready_pipeline(run_dir: Path):
    pipe = idm3d.load_pipeline(run_dir, device="cpu", use_ema=False)
    assert isinstance(pipe, idm3d.DiffusionPipeline)
    assert isinstance(pipe.model, idm3d.IDMUNet)
    assert not pipe.model.training
    tensors = load_file(str(_weights(run_dir)))
    for name, value in pipe.model.state_dict().items():
        assert torch.equal(value, tensors[f"model/{name}"]), name


def _strip_metadata(weights: Path) -> None:
    """Rewrite the weights without metadata and fix the sha256 the state JSON records."""
    tensors = load_file(str(weights))
    save_file(tensors, str(weights))
    state_path = weights.with_suffix(".json")
    state = json.loads(state_path.read_text())
    state["weights_sha256"] = atomic.sha256(weights)
    state_path.write_text(json.dumps(state))


def test_old_runs_without_model_record_load_from_their_config(run_dir: Path, tmp_path: Path):
    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy)
    (copy / "model.json").unlink()
    _strip_metadata(_weights(copy))
    with safe_open(str(_weights(copy)), framework="pt") as fh:
        assert ckpt.MODEL_METADATA_KEY not in (fh.metadata() or {})
    old = idm3d.load_run(copy, device="cpu")
    new = idm3d.load_run(run_dir, device="cpu")
    assert torch.equal(_fixed_output(old.model), _fixed_output(new.model))


@pytest.mark.parametrize(
    ("edit", "fault"),
    [
        (lambda r: r.update(name="evil"), "unknown model name 'evil'"),
        (lambda r: r.update(name="os.system"), "unknown model name 'os.system'"),
        (lambda r: r.update(format="other"), "not an idm3d model record"),
        (lambda r: r.update(kwargs=[1]), "'kwargs' must be a JSON object"),
        (lambda r: r["kwargs"].update(chanels=8), "IDMUNet rejected the options"),
        (lambda r: r["kwargs"].update(attention="foo"), "model.kwargs.attention: must be"),
    ],
)
def test_a_bad_model_json_is_one_checkpoint_error(run_dir: Path, tmp_path: Path, edit, fault):
    copy = tmp_path / "bad"
    shutil.copytree(run_dir, copy)
    _strip_metadata(_weights(copy))
    record = json.loads((copy / "model.json").read_text())
    edit(record)
    (copy / "model.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as info:
        idm3d.load_run(copy, device="cpu")
    assert "model.json" in str(info.value)
    assert fault in str(info.value)
    assert "\n" not in str(info.value)


def test_build_model_from_record_refuses_an_unknown_name_in_one_line():
    with pytest.raises(CheckpointError, match=r"^model\.json: unknown model name 'torch.nn.Linear'"):
        idm3d.build_model_from_record({"format": MODEL_FORMAT, "name": "torch.nn.Linear", "kwargs": {}})


def test_the_monai_baseline_has_a_record_too():
    cfg = ModelConfig("monai", {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1,
                                "norm_num_groups": 8, "num_head_channels": 8})
    record = model_record(cfg, 2, 1)
    assert record["name"] == "monai"
    assert record["class"] == "DiffusionModelUNet"
    assert record["kwargs"]["in_channels"] == 2
    assert "norm_eps" in record["kwargs"]
    json.dumps(record)  # plain JSON
    torch.manual_seed(0)
    a = build_model(cfg, 2, 1)
    torch.manual_seed(0)
    b = idm3d.build_model_from_record(record)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_idm_unet_config_rebuilds_the_same_architecture():
    net = idm3d.IDMUNet(in_channels=3, **TINY_IDM)
    again = type(net)(**net.config)
    assert net.config == again.config
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}


def test_a_config_that_contradicts_the_record_is_another_architecture(run_dir: Path, tmp_path: Path):
    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy)
    (copy / "model.json").unlink()  # the checkpoint's metadata describes the weights
    cfg = (copy / "config.yaml").read_text().replace("blocks_per_level: 1", "blocks_per_level: 2")
    (copy / "config.yaml").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"another architecture \(model\.kwargs\.blocks_per_level: config 2"):
        idm3d.load_run(copy, device="cpu")
