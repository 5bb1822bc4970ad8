"""Every bad input reaches the user as ONE line ``idm3d: error: ...`` naming the file or option, exit code 2.

The real command line runs on each fault: in-process through ``idm3d.cli.main.main`` (stderr captured) and,
for a few, as ``python -m idm3d`` subprocesses, which proves no traceback reaches a terminal. Also: a run
killed after its last checkpoint resumes keeping the newest K checkpoints, and exploding training stops with a
diagnosis and never saves NaN weights. The audit that nothing unpickles is in test_safe_loading.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import BRATS_AFFINE, phantom, t1_to_t2, tiny_run_config, write_brats_folder, write_volume
from idm3d.cli.main import main
from idm3d.errors import CheckpointError
from idm3d.runs.checkpoint import list_checkpoints, load_checkpoint
from idm3d.runs.logs import read_metrics

SRC = Path(__file__).parents[1] / "src"
SHAPE = (16, 16, 16)
CASE = "BraTS20_Training_001"


def make_config(root: Path, **train) -> dict:
    """Translation t1 -> t2, 8^3 patches of 16^3 phantoms, an 8-channel two-level IDMUNet, T = 50."""
    options = {"max_steps": 2, "checkpoint_every": 1, "lr": 1e-3, **train}
    return tiny_run_config(t1_to_t2(root, patch_size=[8, 8, 8]), options)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(rc: int, err: str, *named: object) -> str:
    """Assert the CLI failed the user-facing way and return its one stderr line."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("idm3d: error: "), err
    for item in named:
        assert str(item) in lines[0], f"{item} not named in: {lines[0]}"
    return lines[0]


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def run_subprocesses(*argvs: list[object]) -> list[tuple[int, str, str]]:
    """Run ``python -m idm3d ARGV`` for each ARGV concurrently; ``(returncode, stdout, stderr)`` of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    procs = [subprocess.Popen([sys.executable, "-m", "idm3d", *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for argv in argvs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A data folder, a 2-step run trained through the CLI, and a run of a narrower network."""
    base = tmp_path_factory.mktemp("reliability")
    root = write_brats_folder(base / "data", n_cases=3, shape=SHAPE, modalities=("t1", "t2"))
    cfg = make_config(root)
    assert main(["train", "--config", str(write_config(base / "cfg.yaml", cfg)), "--out", str(base / "run")]) == 0
    cfg["model"]["kwargs"]["channels"] = 4
    assert main(["train", "--config", str(write_config(base / "narrow.yaml", cfg)), "--out", str(base / "narrow")]) == 0
    return {"data": root, "run": base / "run", "narrow": base / "narrow",
            "t1": root / "BraTS20_Training_002" / "BraTS20_Training_002_t1.nii.gz"}


# ------------------------------------------------------------------------------------------ data faults


def _file(case: Path, modality: str = "t1") -> Path:
    return case / f"{case.name}_{modality}.nii.gz"


def _flip_middle_byte(case: Path) -> None:
    data = bytearray(_file(case).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _file(case).write_bytes(bytes(data))


def _plain_nii_text(case: Path) -> None:
    _file(case).unlink()
    (case / f"{case.name}_t1.nii").write_text("a text file renamed to .nii\n" * 20)


def _voxel(value: float) -> Callable[[Path], None]:
    def mutate(case: Path) -> None:
        data = phantom(SHAPE, "t1")
        data[3, 4, 5] = value
        write_volume(_file(case), data)

    return mutate


def _shifted_affine(case: Path) -> None:
    affine = BRATS_AFFINE.copy()
    affine[0, 3] += 2.5
    write_volume(_file(case), phantom(SHAPE, "t1"), affine)


def _empty_folder(case: Path) -> None:
    for path in case.parent.iterdir():
        shutil.rmtree(path)


# (fault, mutation of case 001, text of the fault, what the line must name: "file" (its t1), "t2 file", "case", "root")
DATA_FAULTS = [
    ("truncated_gz", lambda c: _file(c).write_bytes(_file(c).read_bytes()[:300]), "corrupt or truncated", "file"),
    ("corrupt_gz", _flip_middle_byte, "corrupt or truncated", "file"),
    ("text_named_nii_gz", lambda c: _file(c).write_text("not an image\n" * 40), "not a NIfTI file", "file"),
    ("text_named_nii", _plain_nii_text, "not a NIfTI file", "nii"),
    ("2d_image", lambda c: write_volume(_file(c), phantom(SHAPE, "t1")[:, :, 8]), "got 2D data", "file"),
    ("4d_image", lambda c: write_volume(_file(c), np.stack([phantom(SHAPE, "t1")] * 2, -1)), "got 4D data", "file"),
    ("shape_mismatch", lambda c: write_volume(_file(c), phantom((16, 16, 12), "t1")), "shape (16, 16, 12)", "file"),
    ("affine_mismatch", _shifted_affine, "affine differs", "file"),
    ("all_zero", lambda c: write_volume(_file(c), np.zeros(SHAPE, np.float32)), "volume is constant", "file"),
    ("nan_voxel", _voxel(float("nan")), "non-finite voxels (1 NaN, 0 Inf", "file"),
    ("inf_voxel", _voxel(float("inf")), "non-finite voxels (0 NaN, 1 Inf", "file"),
    ("missing_modality", lambda c: _file(c, "t2").unlink(), "has no t2 file", "case"),
    ("empty_folder", _empty_folder, "data folder is empty", "root"),
]


@pytest.mark.parametrize(("fault", "mutate", "text", "named"), DATA_FAULTS, ids=[f[0] for f in DATA_FAULTS])
def test_bad_data_is_one_line_from_train_and_listed_by_data_check(tmp_path: Path, capsys, fault, mutate, text, named):
    root = write_brats_folder(tmp_path / "data", n_cases=3, shape=SHAPE, modalities=("t1", "t2"))
    case = root / CASE
    mutate(case)
    path = {"file": _file(case), "nii": case / f"{CASE}_t1.nii", "case": case, "root": root}[named]
    cfg = write_config(tmp_path / "cfg.yaml", make_config(root))

    rc, _, err = run_cli(capsys, "train", "--config", cfg, "--out", tmp_path / "run")
    line = one_line_error(rc, err, path, text)
    assert "data check failed with 1 problem(s)" in line
    assert not (tmp_path / "run" / "checkpoints").exists()

    rc, out, err = run_cli(capsys, "data", "check", root)
    assert rc == 2
    assert err.strip().splitlines() == [f"idm3d: 1 problem(s) in {root}"]
    assert len(out.strip().splitlines()) == 1
    assert str(path) in out
    assert text in out


def test_condition_file_of_sample_is_checked_too(runs, tmp_path: Path, capsys):
    bad = tmp_path / "t1.nii.gz"
    write_volume(bad, np.zeros(SHAPE, np.float32))
    rc, _, err = run_cli(capsys, "sample", "--run", runs["run"], "--condition", bad, "--out", tmp_path / "o.nii.gz")
    one_line_error(rc, err, bad, "volume is constant")


def test_evaluate_reports_a_held_out_case_damaged_after_training(runs, tmp_path: Path, capsys):
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["root"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    test_case = json.loads((run / "split.json").read_text())["test"][0]
    victim = data / test_case / f"{test_case}_t2.nii.gz"
    victim.write_bytes(victim.read_bytes()[:-40])
    rc, _, err = run_cli(capsys, "evaluate", "--run", run, "--no-progress")
    one_line_error(rc, err, victim, "corrupt or truncated")


# ---------------------------------------------------------------------------------------- config faults


def _cfg_file(name: str, edit: Callable[[dict], None] | None = None, text: str | bytes | None = None):
    def setup(tmp: Path, root: Path) -> Path:
        path = tmp / name
        if text is None:
            cfg = make_config(root)
            if edit is not None:
                edit(cfg)
            path.write_text(json.dumps(cfg) if name.endswith(".json") else yaml.safe_dump(cfg))
        elif isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    return setup


CONFIG_FAULTS = [
    ("unknown_key", _cfg_file("c.yaml", lambda c: c["train"].update(max_stepz=3)), [],
     "train.max_stepz: unknown option"),
    ("unknown_section", _cfg_file("c.yaml", lambda c: c.update(optimiser={"lr": 1})), [], "optimiser: unknown option"),
    ("wrong_type_in_file", _cfg_file("c.json", lambda c: c["train"].update(lr="fast")), [],
     "train.lr: expected a finite number, got 'fast'"),
    ("wrong_type_set", _cfg_file("c.yaml"), ["--set", "data.patch_size=8"], "data.patch_size: expected a list"),
    ("out_of_range_set", _cfg_file("c.yaml"), ["--set", "train.max_steps=0"],
     "train.max_steps: expected an integer >= 1"),
    ("bad_choice_set", _cfg_file("c.yaml"), ["--set", "diffusion.schedule=quadratic"], "diffusion.schedule: expected"),
    ("missing_file", lambda tmp, root: tmp / "nope.yaml", [], "cannot read config"),
    ("invalid_yaml", _cfg_file("c.yaml", text="train: {max_steps: [1, 2\n"), [], "not valid YAML"),
    ("invalid_json", _cfg_file("c.json", text='{"train": }'), [], "not valid JSON"),
    ("python_object_tag", _cfg_file("c.yaml", text="train: !!python/object/apply:os.system ['echo pwned']\n"), [],
     "python/object/apply:os.system"),
    ("binary_file", _cfg_file("c.yaml", text=bytes(range(256)) * 4), [], "not a text config file"),
]


@pytest.mark.parametrize(("fault", "setup", "extra", "text"), CONFIG_FAULTS, ids=[f[0] for f in CONFIG_FAULTS])
def test_bad_config_is_one_line_naming_the_file_and_key(runs, tmp_path: Path, capsys, fault, setup, extra, text):
    path = setup(tmp_path, runs["data"])
    rc, _, err = run_cli(capsys, "train", "--config", path, "--out", tmp_path / "run", *extra)
    one_line_error(rc, err, path, text)
    assert not (tmp_path / "run").exists()


def test_safe_loader_never_runs_the_python_tag(tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    touch = f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]"
    path.write_text(f"data: {touch}\n")
    rc, _, err = run_cli(capsys, "train", "--config", path)
    one_line_error(rc, err, path, "not valid YAML")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ checkpoint faults


def _edit_state(**changes) -> Callable[[Path], Path]:
    def edit(ckpts: Path) -> Path:
        meta = ckpts / "step-00000002.json"
        state = json.loads(meta.read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del state[key]
            else:
                state[key] = value
        meta.write_text(json.dumps(state))
        return meta

    return edit


_DELETE = object()


def _damage_weights(how: str) -> Callable[[Path], Path]:
    def damage(ckpts: Path) -> Path:
        weights = ckpts / "step-00000002.safetensors"
        data = bytearray(weights.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0x01
        elif how == "truncate":
            data = data[: len(data) - 100]
        weights.write_bytes(bytes(data))
        if how == "delete":
            weights.unlink()
            return ckpts / "step-00000002.json"
        return weights

    return damage


def _signature_of_another_model(ckpts: Path) -> Path:
    meta = ckpts / "step-00000002.json"
    state = json.loads(meta.read_text())
    state["signature"] = {**state["signature"], "num_parameters": 1, "digest": "0" * 64}
    meta.write_text(json.dumps(state))
    return meta


def _weights_of_another_run_with_a_matching_hash(narrow: Path) -> Callable[[Path], Path]:
    def swap(ckpts: Path) -> Path:
        weights = ckpts / "step-00000002.safetensors"
        weights.write_bytes((narrow / "checkpoints" / weights.name).read_bytes())
        _edit_state(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())(ckpts)
        return ckpts / "step-00000002.json"

    return swap


CHECKPOINT_FAULTS = [
    ("weights_byte_flipped", _damage_weights("flip"), "sha256"),
    ("weights_truncated", _damage_weights("truncate"), "sha256"),
    ("weights_deleted", _damage_weights("delete"), "weights file 'step-00000002.safetensors' is missing"),
    ("state_not_json", lambda c: (c / "step-00000002.json").write_text("{oops") and c / "step-00000002.json",
     "unreadable checkpoint state"),
    ("state_step_string", _edit_state(step="two"), "field 'step': expected int, got 'two'"),
    ("state_step_moved", _edit_state(step=7), "says step 7"),
    ("state_step_deleted", _edit_state(step=_DELETE), "lacks the field 'step'"),
    ("state_weights_file_path", _edit_state(weights_file="../../etc/passwd"), "field 'weights_file'"),
    ("state_optimizer_wrong_type", _edit_state(optimizer=5), "field 'optimizer': expected dict"),
    ("state_elapsed_wrong_type", _edit_state(elapsed_s="x"), "field 'elapsed_s'"),
    ("state_format", _edit_state(format="other-v9"), "not an idm3d checkpoint"),
    ("state_signature_edited", _signature_of_another_model, "another architecture"),
    ("weights_of_another_run", "swap", "checkpoint does not fit the model (shape mismatch"),
]


@pytest.mark.parametrize(("fault", "damage", "text"), CHECKPOINT_FAULTS, ids=[f[0] for f in CHECKPOINT_FAULTS])
def test_tampered_checkpoint_is_refused_by_sample_and_resume(runs, tmp_path: Path, capsys, fault, damage, text):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    if damage == "swap":
        damage = _weights_of_another_run_with_a_matching_hash(runs["narrow"])
    named = damage(run / "checkpoints")
    rc, _, err = run_cli(capsys, "sample", "--run", run, "--condition", runs["t1"], "--out", tmp_path / "o.nii.gz",
                         "--no-progress")
    one_line_error(rc, err, named, text)
    assert not (tmp_path / "o.nii.gz").exists()
    rc, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--set", "train.max_steps=3")
    one_line_error(rc, err, named, text)


def test_evaluate_refuses_a_tampered_checkpoint(runs, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    weights = _damage_weights("flip")(run / "checkpoints")
    rc, _, err = run_cli(capsys, "evaluate", "--run", run, "--no-progress")
    one_line_error(rc, err, weights, "does not match the recorded")


def test_checkpoint_of_another_architecture(runs, tmp_path: Path, capsys):
    foreign = runs["narrow"] / "checkpoints" / "step-00000002.json"
    out = tmp_path / "o.nii.gz"
    rc, _, err = run_cli(capsys, "sample", "--run", runs["run"], "--checkpoint", foreign, "--condition", runs["t1"],
                         "--out", out)
    one_line_error(rc, err, foreign, "another architecture", "channels': 4", "channels': 8")
    # A run whose config no longer describes its weights.
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["kwargs"]["blocks_per_level"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(capsys, "sample", "--run", run, "--condition", runs["t1"], "--out", out)
    one_line_error(rc, err, run / "checkpoints" / "step-00000002.json", "another architecture")
    # Resuming with a different model.
    run = tmp_path / "run2"
    shutil.copytree(runs["run"], run)
    rc, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--set",
                         "model.kwargs={channels: 8, levels: 2, blocks_per_level: 2, attention_levels: [false, false]}")
    one_line_error(rc, err, run / "checkpoints" / "step-00000002.json", "another architecture")
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "text"),
    [(lambda info: info.update(grid_shape="big"), "'grid_shape' must be 3 positive integers"),
     (lambda info: info.update(scalings={"t2": {"lo": "0"}}), "'scalings' must map"),
     (lambda info: info["grid_affine"].pop(), "'grid_affine' must be a 4x4"),
     (lambda info: info.clear(), None)],
    ids=["grid_shape", "scalings", "affine", "valid_but_sparse"],
)
def test_edited_data_json_is_refused_by_sample(runs, tmp_path: Path, capsys, edit, text):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    info = json.loads((run / "data.json").read_text())
    edit(info)
    (run / "data.json").write_text(json.dumps(info))
    out = tmp_path / "o.nii.gz"
    rc, _, err = run_cli(capsys, "sample", "--run", run, "--condition", runs["t1"], "--out", out, "--no-progress")
    if text is None:  # missing optional fields: sampling falls back (condition grid, raw intensities)
        assert rc == 0, err
        assert out.is_file()
    else:
        one_line_error(rc, err, run / "data.json", text)


@pytest.mark.parametrize(
    ("changes", "text"),
    [({"step": True}, "'step': expected int"), ({"seed": 1.5}, "'seed': expected int"),
     ({"ema_updates": -3}, "'ema_updates': expected >= 0"), ({"last_loss": "low"}, "'last_loss'"),
     ({"signature": [1, 2]}, "'signature': expected dict"), ({"weights_sha256": 12}, "'weights_sha256'")],
)
def test_state_json_fields_are_type_checked(runs, tmp_path: Path, changes, text):
    folder = tmp_path / "checkpoints"
    shutil.copytree(runs["run"] / "checkpoints", folder)
    meta = _edit_state(**changes)(folder)
    with pytest.raises(CheckpointError, match=re.escape(text)) as info:
        load_checkpoint(meta)
    assert str(meta) in str(info.value)


# -------------------------------------------------------------------------------- --debug and subprocess


def test_debug_shows_the_traceback(runs, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    _damage_weights("flip")(run / "checkpoints")
    rc, _, err = run_cli(capsys, "--debug", "sample", "--run", run, "--condition", runs["t1"], "--out",
                         tmp_path / "o.nii.gz")
    assert rc == 2
    assert "Traceback (most recent call last)" in err
    assert "idm3d.errors.CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("idm3d: error: ")


def test_real_subprocesses_print_one_line_and_no_traceback(runs, tmp_path: Path):
    root = write_brats_folder(tmp_path / "data", n_cases=3, shape=SHAPE, modalities=("t1", "t2"))
    nan_file = _file(root / CASE)
    _voxel(float("nan"))(root / CASE)
    cfg = write_config(tmp_path / "cfg.yaml", make_config(root))
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    weights = _damage_weights("flip")(run / "checkpoints")
    sample = ["sample", "--run", run, "--condition", runs["t1"], "--out", tmp_path / "o.nii.gz", "--no-progress"]
    cases = [
        (["train", "--config", cfg, "--out", tmp_path / "r"], [nan_file, "non-finite voxels"]),
        (["train", "--config", evil], [evil, "not valid YAML"]),
        (sample, [weights, "sha256"]),
    ]
    *results, debug, check = run_subprocesses(*[argv for argv, _ in cases], ["--debug", *sample],
                                              ["data", "check", root])
    for (rc, _, err), (_, named) in zip(results, cases):
        one_line_error(rc, err, *named)
    rc, _, err = debug
    assert rc == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith(f"idm3d: error: {weights}")
    rc, out, err = check
    assert rc == 2
    assert "Traceback" not in err
    assert out.strip() == f"{nan_file}: contains non-finite voxels (1 NaN, 0 Inf of {np.prod(SHAPE)})"


# ------------------------------------------------------------------------ crash leftovers and non-finite


def test_resume_after_a_crash_mid_checkpoint_keeps_the_newest_k(runs, tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", make_config(runs["data"], max_steps=4, keep_checkpoints=2))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    ckpts = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [3, 4]
    # What a SIGKILL while writing step 5 leaves: torn temp files and weights whose JSON never came.
    (ckpts / ".step-00000005.safetensors.tmp-4242").write_bytes(b"\x00" * 64)
    (ckpts / "step-00000005.safetensors").write_bytes((ckpts / "step-00000004.safetensors").read_bytes())
    (ckpts / ".step-00000005.json.tmp-4242").write_text('{"format": "idm3d-chec')
    rc, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--set", "train.max_steps=6")
    assert rc == 0, err
    assert "resuming from step-00000004.json at step 4 (removed 3 incomplete file(s))" in err
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step-00000005.json", "step-00000005.safetensors", "step-00000006.json", "step-00000006.safetensors"]
    for _, meta in list_checkpoints(ckpts):
        load_checkpoint(meta)  # hash and fields verify
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_exploding_training_stops_with_a_diagnosis_and_saves_no_nan(runs, tmp_path: Path, capsys):
    """lr = 1e30: after one update the weights are ~1e30 and every further loss overflows."""
    cfg = write_config(tmp_path / "cfg.yaml", make_config(runs["data"], max_steps=20, lr=1e30, nonfinite_patience=3))
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--config", cfg, "--out", run)
    lines = err.strip().splitlines()
    assert rc == 2
    assert "Traceback" not in err
    assert lines[:-1] == [f"idm3d: warning: step {s}: non-finite loss/gradient, update skipped ({s - 1} in a row)"
                          for s in (2, 3, 4)]
    assert re.fullmatch(r"idm3d: error: 3 steps in a row \(up to step 4\) had a non-finite loss or gradient "
                        r"\(train\.nonfinite_patience=3\); .*module [\w.]+ \(\w+\).*", lines[-1]), lines[-1]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("skipped")] == [2, 3, 4]
    saved = {s: load_file(str(m.with_suffix(".safetensors"))) for s, m in list_checkpoints(run / "checkpoints")}
    assert sorted(saved) == [1, 2, 3]
    for tensors in saved.values():
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
        assert all(torch.equal(tensors[k], saved[1][k]) for k in tensors if k.startswith("model/"))
