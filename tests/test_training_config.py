"""Run configuration: YAML/JSON loading, --set overrides, one-line ConfigError naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from idm3d.errors import ConfigError
from idm3d.runs.config import Config, config_from_dict, config_to_dict, load_config, save_config


@pytest.mark.parametrize(
    ("overrides", "key", "fault"),
    [
        (["train.lrr=1"], "train.lrr", "unknown option"),
        (["bogus.x=1"], "bogus", "unknown option"),
        (["train.lr=-1"], "train.lr", "> 0"),
        (["train.lr=abc"], "train.lr", "finite number"),
        (["train.lr=.nan"], "train.lr", "finite number"),
        (["train.max_steps=1.5"], "train.max_steps", "integer"),
        (["train.max_steps=0"], "train.max_steps", ">= 1"),
        (["train.max_steps=true"], "train.max_steps", "integer"),
        (["train.ema_decay=1.5"], "train.ema_decay", "<= 1.0"),
        (["train.progress=3"], "train.progress", "true/false"),
        (["data.task=segment"], "data.task", "generate|translate"),
        (["diffusion.schedule=quadratic"], "diffusion.schedule", "cosine"),
        (["diffusion.prediction_type=x0"], "diffusion.prediction_type", "v_prediction"),
        (["data.patch_size=[16,16]"], "data.patch_size", "3 integers"),
        (["data.patch_size=[16,2,16]"], "data.patch_size[1]", ">= 4"),
        (["data.patch_size=16"], "data.patch_size", "list of"),
        (["model.name=unet"], "model.name", "idm|monai"),
        (["model.kwargs=[1]"], "model.kwargs", "mapping"),
        (["data.task=translate"], "data.sources", "at least one source"),
        (["data.sources=[t1]"], "data.sources", "takes no source"),
        (["train.max_steps=null"], "train.max_steps", "max_seconds"),
        (["sample.steps=5000"], "sample.steps", "num_train_timesteps"),
        (["diffusion.beta_end=0.00001"], "diffusion.beta_end", "beta_start"),
        (["data.test_fraction=0.5", "data.val_fraction=0.5"], "data.test_fraction", "< 1"),
        (["train"], "--set train", "key.sub=value"),
    ],
)
def test_bad_values_raise_one_line_config_error_naming_the_key(overrides, key, fault):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.root=/data", *overrides])
    message = str(info.value)
    assert message.startswith(key), message
    assert fault in message
    assert "\n" not in message


def test_overrides_are_parsed_as_yaml_and_applied():
    cfg = load_config(None, ["data.root=/data", "train.lr=3e-4", "data.patch_size=[8, 16, 24]",
                             "model.kwargs={channels: 8, levels: 2}", "train.max_seconds=12", "train.max_steps=null"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.patch_size == [8, 16, 24]
    assert cfg.model.kwargs == {"channels": 8, "levels": 2}
    assert cfg.train.max_steps is None
    assert cfg.train.max_seconds == 12.0
    assert isinstance(cfg.train.max_seconds, float)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_round_trip_and_file_named_in_errors(tmp_path: Path, suffix: str):
    cfg = load_config(None, ["data.root=/data", "data.task=translate", "data.sources=[t1]", "data.targets=[t2]",
                             "diffusion.schedule=cosine", "diffusion.prediction_type=v_prediction"])
    path = tmp_path / f"cfg{suffix}"
    save_config(cfg, path)
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.data.sources == ["t1"]
    with pytest.raises(ConfigError, match=rf"^{path}: train.lr:"):
        load_config(path, ["train.lr=0"])


def test_yaml_is_loaded_safely(tmp_path: Path):
    path = tmp_path / "evil.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "fault"),
    [("[1, 2]", "mapping of sections"), ("train: 3", "train: expected a mapping"), ("{", "not valid YAML")],
)
def test_malformed_files(tmp_path: Path, text: str, fault: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fault):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_use_demo_data_and_paper_settings():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.data.root is None  # the embedded demo templates
    assert cfg.diffusion.prediction_type == "epsilon"
    assert cfg.diffusion.num_train_timesteps == 1000
    assert json.loads(json.dumps(config_to_dict(cfg))) == yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))


def test_demo_data_only_has_t1_and_t2():
    with pytest.raises(ConfigError, match=r"^data.targets: the demo data"):
        config_from_dict({"data": {"targets": ["flair"]}})
