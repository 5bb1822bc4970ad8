"""Layers talk through types: lower layers raise ``ArgumentError(argument, detail)``, upper layers map
``err.argument`` to the config key through a table and never parse an exception's text; ``model.kwargs``
is checked against the network's own signature; ``idm3d.sample`` is a deprecated alias."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import pytest

import idm3d
from idm3d.cli.main import main
from idm3d.data.cases import Problem, scan_cases
from idm3d.data.patches import PatchSampler
from idm3d.devices import resolve_device
from idm3d.diffusion import schedule
from idm3d.errors import ArgumentError, ConfigError, IDM3DError
from idm3d.runs.config import load_config
from idm3d.runs.data_source import naming_keys
from idm3d.runs.load import build_scheduler

SRC = Path(__file__).resolve().parents[1] / "src"
# Splitting an exception's message to find the argument or key it names.
PARSING = re.compile(
    r"str\((err|exc|e|error)\)\s*\.\s*(partition|split|rpartition|rsplit)\(|\.partition\(\s*['\"]: ['\"]\s*\)"
)


def test_no_code_parses_exception_text():
    found = [
        f"{path.relative_to(SRC)}:{n}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PARSING.search(line)
    ]
    assert not found, "exception text parsed (use ArgumentError's fields):\n" + "\n".join(found)


def test_argument_error_is_a_value_error_with_fields_not_an_idm3d_error():
    err = ArgumentError("patch_size", "expected 3 sizes, got (1,)")
    assert isinstance(err, ValueError)
    assert not isinstance(err, IDM3DError)
    assert (err.argument, err.detail, str(err)) == ("patch_size", "expected 3 sizes, got (1,)",
                                                    "patch_size: expected 3 sizes, got (1,)")
    again = pickle.loads(pickle.dumps(err))
    assert (again.argument, again.detail) == (err.argument, err.detail)


def test_lower_layers_raise_argument_errors():
    with pytest.raises(ArgumentError) as info:
        resolve_device("tpu")
    assert info.value.argument == "device"
    assert "expected auto, cpu or cuda" in info.value.detail
    with pytest.raises(ArgumentError) as info:
        PatchSampler([], [], (8, 8, 8), batch_size=1)
    assert info.value.argument == "volumes"

    class Diffusion:
        num_train_timesteps, schedule, beta_start, beta_end = 10, "linear", 1e-4, 2e-2
        prediction_type, clip_sample = "epsilon", True

    with pytest.raises(ArgumentError) as info:
        schedule.build_scheduler(Diffusion(), "ddim", 11)
    assert info.value.argument == "num_inference_steps"
    with pytest.raises(ArgumentError) as info:
        idm3d.IDMUNet(channels=1, levels=1, attention_levels=[False])
    assert info.value.argument == "channels"


def test_the_config_layer_maps_arguments_through_its_tables():
    cfg = load_config(None, ["diffusion.num_train_timesteps=10", "sample.steps=10"])
    with pytest.raises(ConfigError, match=r"^sample\.steps: expected an integer in \[1, 10\]"):
        build_scheduler(cfg, "ddim", 11)
    with pytest.raises(ConfigError, match=r"^sample\.sampler: expected ddpm\|ddim"):
        build_scheduler(cfg, "euler")
    with pytest.raises(ConfigError, match=r"^data\.batch_size: expected >= 1"), naming_keys():
        raise ArgumentError("batch_size", "expected >= 1, got 0")
    with pytest.raises(ArgumentError), naming_keys():  # an argument no key stands for: a bug, traceback kept
        raise ArgumentError("volumes", "no volumes to sample from")


@pytest.mark.parametrize(
    ("option", "line"),
    [
        ("data.patch_size=[7,7,7]", "data.patch_size: expected multiples of 2"),
        ("sample.steps=0", "sample.steps: expected an integer >= 1, got 0"),
        ("train.device=tpu", "train.device: expected auto, cpu or cuda[:N], got 'tpu'"),
        ("model.kwargs={chanels: 8}", "model.kwargs.chanels: not an argument of IDMUNet (did you mean channels?)"),
        ("model.kwargs={channels: eight}", "model.kwargs.channels: expected an integer, got 'eight'"),
        ("model.kwargs={bookends: 1}", "model.kwargs.bookends: expected true/false, got 1"),
        ("model.kwargs={attention_levels: 3}", "model.kwargs.attention_levels: expected a list of true/false"),
        ("model.kwargs={out_channels: 2}", "model.kwargs.out_channels: set by the task"),
        ("model.kwargs={channels: 1, levels: 1, attention_levels: [false]}", "model.kwargs.channels: must be >= 2"),
    ],
)
def test_cli_errors_name_the_key_in_one_line(tmp_path: Path, capsys, option: str, line: str):
    args = ["train", "--out", str(tmp_path / "run"), "--set", "train.max_steps=1", "--set", "train.progress=false",
            "--set", "train.log.tensorboard=false", "--set", "data.patch_size=[8,8,8]",
            "--set", "model.kwargs={channels: 8, levels: 2, blocks_per_level: 1, attention_levels: [false, false]}",
            "--set", option]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idm3d: error: "), err
    assert "\n" not in err, err
    assert line in err, err


def test_monai_kwargs_are_checked_against_its_signature():
    with pytest.raises(ConfigError, match=r"^model\.kwargs\.num_res_blok: not an argument of DiffusionModelUNet "
                                          r"\(did you mean num_res_blocks\?\)"):
        load_config(None, ["model.name=monai", "model.kwargs={num_res_blok: 1}"])
    with pytest.raises(ConfigError, match=r"^model\.kwargs\.channels: expected a list of integers, got 8"):
        load_config(None, ["model.name=monai", "model.kwargs={channels: 8}"])


def test_scan_problems_are_records(tmp_path: Path):
    (tmp_path / "case_a").mkdir()
    (tmp_path / "case_a" / "case_a_t1.nii.gz").write_bytes(b"")
    _cases, problems = scan_cases(tmp_path, ("t1", "t2"))
    (problem,) = problems
    assert isinstance(problem, Problem)
    assert problem.file == tmp_path / "case_a"
    assert problem.detail.startswith("case case_a has no t2 file")
    assert problem == f"{problem.file}: {problem.detail}"  # also the line `idm3d data check` prints
    _, (missing,) = scan_cases(tmp_path / "absent", ("t1",))
    assert (missing.file, missing.detail) == (tmp_path / "absent", "data folder not found")


def test_sample_is_a_deprecated_alias_of_sample_to_file(monkeypatch):
    from idm3d.inference import generate

    calls = []
    monkeypatch.setattr(generate, "sample_to_file", lambda *a, **k: calls.append((a, k)) or ["out"])
    monkeypatch.setattr(generate, "_SAMPLE_WARNED", False)
    with pytest.warns(DeprecationWarning, match="idm3d.sample_to_file"):
        assert idm3d.sample("run", "x.nii.gz", steps=2) == ["out"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert idm3d.sample("run", "y.nii.gz") == ["out"]  # warned once
    assert calls == [(("run", "x.nii.gz"), {"steps": 2}), (("run", "y.nii.gz"), {})]
    assert idm3d.sample_to_file is generate.sample_to_file
