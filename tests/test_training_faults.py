"""Faults where users train, in one process: a stop signal (checkpoint at the current step, exit 75),
``--resume auto`` (start or continue; a changed config refused) and a failed write at every stage of a
checkpoint (previous checkpoint intact, one line, and the continued run ends bit-identical)."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_IDM, tiny_run_config, write_brats_folder
from idm3d.cli.main import main
from idm3d.runs import atomic
from idm3d.runs import checkpoint as ckpt
from idm3d.runs.config import config_from_dict
from idm3d.runs.logs import MetricsLog, read_metrics
from idm3d.runs.rundir import RunWriteError
from idm3d.training import stopping
from idm3d.training.stopping import StopSignals, TrainingStopped
from idm3d.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")


class GlobalBatch:
    """A deterministic batch per step, without files."""

    def batch(self, step: int) -> tuple[torch.Tensor, None]:
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(1, 1, 16, 16, 16, generator=g), None


def _cfg(max_steps: int = 4, **train):
    return config_from_dict({
        "data": {"root": None, "targets": ["t1"], "patch_size": [16, 16, 16], "batch_size": 1},
        "model": {"name": "idm", "kwargs": TINY_IDM},
        "diffusion": {"num_train_timesteps": 50},
        "train": {"max_steps": max_steps, "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1,
                  "progress": False, "device": "cpu", "seed": 7, "lr": 1e-3, **train},
    })


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))
    return tensors


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final tensors (model, EMA, optimizer) of an uninterrupted 4-step run."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("reference") / "run"
    Trainer(_cfg(), run, data=GlobalBatch()).run()
    return _weights(run)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_the_current_step_and_resume_auto_is_bit_identical(tmp_path: Path, reference):
    run = tmp_path / "run"
    trainer = Trainer(_cfg(checkpoint_every=100), run, resume="auto", data=GlobalBatch())
    trainer.on_step.append(lambda t, _r: os.kill(os.getpid(), signal.SIGTERM) if t.step == 3 else None)
    with pytest.raises(TrainingStopped) as stop:
        trainer.run()
    assert (stop.value.signal_name, stop.value.step) == ("SIGTERM", 3)
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [3]  # not due: written for the stop
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = Trainer(_cfg(checkpoint_every=100), run, resume="auto", data=GlobalBatch())
    assert resumed.step == 3  # lost work: 0 steps
    resumed.run()
    assert _same(_weights(run), reference)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_second_sigint_interrupts_at_once_but_a_forwarded_copy_does_not(monkeypatch):
    with StopSignals(["INT", "USR1"], announce=False) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGINT)  # within the repeat window: the same keypress, forwarded
        assert stop.received == "SIGUSR1"
    with StopSignals(["INT"], announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", -1.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_resume_auto_starts_stops_with_75_continues_and_refuses_another_config(tmp_path, capfd, monkeypatch):
    root = write_brats_folder(tmp_path / "data", n_cases=3, shape=(24, 24, 24), modalities=("t1",))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config({"root": str(root)}, {"max_steps": 3, "checkpoint_every": 10})))
    run = str(tmp_path / "run")
    command = ["train", "--config", str(cfg), "--out", run, "--resume", "auto"]
    step = Trainer.train_step

    def stop_after_two(self, i, batch=None):
        result = step(self, i, batch)
        if i == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    monkeypatch.setattr(Trainer, "train_step", stop_after_two)
    assert main([*command, "--set", "train.stop_signals=[TERM, INT, USR1]"]) == 75
    err = capfd.readouterr().err
    assert "idm3d: SIGUSR1: stopping after the current step with a checkpoint" in err
    assert "idm3d: stopped by SIGUSR1 after step 2; checkpoint" in err
    assert "--resume auto" in err
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(command) == 0  # train.stop_signals may change
    assert "resuming from step-00000002.json at step 2" in capfd.readouterr().err
    assert main(command) == 0  # finished: rerunning the job does nothing
    capfd.readouterr()
    assert main([*command, "--set", "train.lr=0.5", "--set", "train.max_steps=9"]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("idm3d: error: --resume auto: ")
    assert "\n" not in err
    assert "(differs in train.lr; only train.max_steps," in err
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "auto"]) == 2
    assert "holds no run yet; pass --config" in capfd.readouterr().err


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _inject(monkeypatch, stage: str, nth: int, code: int) -> None:
    """Raise OSError(code) at the ``nth`` time the write ``stage`` happens."""
    seen = {"n": 0}

    def due() -> bool:
        seen["n"] += 1
        return seen["n"] == nth

    def fail(name: str = "") -> OSError:
        return OSError(code, os.strerror(code), name or None)

    def when(test: Callable[[str], bool], real: Callable, arg_path: Callable[..., str]):
        def patched(*args, **kwargs):
            if test(arg_path(*args)) and due():
                raise fail(arg_path(*args))
            return real(*args, **kwargs)
        return patched

    if stage == "weights temp file":
        real_save = atomic.save_file

        def save_file(tensors, path, metadata=None):
            if due():
                Path(path).write_bytes(b"\0" * 100)  # what a full disk leaves: a torn temporary file
                raise fail(path)
            return real_save(tensors, path, metadata=metadata)
        monkeypatch.setattr(atomic, "save_file", save_file)
    elif stage in ("weights fsync", "state JSON fsync"):
        mark = ".safetensors.tmp-" if stage.startswith("weights") else ".json.tmp-"
        monkeypatch.setattr(os, "fsync", when(lambda p: mark in p and "step-" in p, os.fsync, _fd_path))
    elif stage in ("weights rename", "state JSON rename", "model.json"):
        mark = {"weights rename": ".safetensors.tmp-", "state JSON rename": ".json.tmp-"}.get(stage, "model.json.tmp-")
        step = "" if stage == "model.json" else "step-"
        monkeypatch.setattr(os, "replace", when(lambda p: mark in p and step in p, os.replace,
                                                lambda src, dst: str(src)))
    elif stage == "metrics":
        real_write = MetricsLog.write
        monkeypatch.setattr(MetricsLog, "write", lambda self, r: (_ for _ in ()).throw(fail(str(self.path)))
                            if due() else real_write(self, r))


STAGES = [  # (stage, which occurrence fails, errno): the checkpoint at step 4 of a 4-step run fails
    ("weights temp file", 2, errno.ENOSPC),
    ("weights fsync", 2, errno.ENOSPC),
    ("weights rename", 2, errno.EDQUOT),
    ("state JSON fsync", 2, errno.ENOSPC),
    ("state JSON rename", 2, errno.ENOSPC),
    ("metrics", 3, errno.ENOSPC),  # the record of step 3
    ("model.json", 1, errno.EROFS),  # written when the run resumes from step 2
]


@pytest.mark.parametrize(("stage", "nth", "code"), STAGES, ids=[s[0] for s in STAGES])
def test_a_failed_write_at_each_stage_keeps_the_last_checkpoint_and_stops_with_one_line(
        tmp_path: Path, monkeypatch, reference, stage: str, nth: int, code: int):
    run = tmp_path / "run"
    if stage == "model.json":
        Trainer(_cfg(max_steps=2), run, data=GlobalBatch()).run()
    with monkeypatch.context() as patch:
        _inject(patch, stage, nth, code)
        with pytest.raises(RunWriteError) as err:
            Trainer(_cfg(), run, resume="auto", data=GlobalBatch()).run()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{run}: cannot write ")
    assert f"{errno.errorcode[code]}); " in message
    assert " MiB free of " in message
    assert "last complete checkpoint step-00000002.json is intact" in message
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000002.json", "step-00000002.safetensors"]  # no torn or orphan file
    ckpt.load_checkpoint(run / "checkpoints" / "step-00000002.json")
    resumed = Trainer(_cfg(), run, resume="auto", data=GlobalBatch())
    assert resumed.step == 2
    resumed.run()
    assert _same(_weights(run), reference)
