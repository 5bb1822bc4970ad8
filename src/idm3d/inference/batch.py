"""Batch inference with one loaded run: every case of a folder (translation), or N seeded samples (generation).

Both write into an output folder, one volume per case (or sample) and target, and a ``samples.json``
manifest (run, checkpoint, weights, sampler settings, and each output's case or seed). The format is
``out_format`` (:data:`OUT_FORMATS`), the rule of ``idm3d sample --out NAME``'s suffix for a batch: ``nifti``
(the default), ``nrrd``, ``mha``, ``dicom`` (CT runs) or ``input`` (each case in its first source's format); a
translation lies on its case's grid, whatever the format. They are resumable: a case whose outputs all exist
is skipped (every output is written atomically, so an existing one is complete). A case that fails is reported
in one line naming it and the others go on; :attr:`BatchResult.failed` lists what failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from idm3d.data.cases import scan_cases
from idm3d.data.readers import image_format, volume_suffix
from idm3d.errors import ConfigError, IDM3DError
from idm3d.inference.generate import output_paths, write_sample
from idm3d.jsonio import dumps
from idm3d.runs.atomic import atomic_write_text
from idm3d.runs.load import LoadedRun

__all__ = ["MANIFEST", "OUT_FORMATS", "BatchResult", "output_suffix", "sample_folder", "sample_many"]

MANIFEST = "samples.json"
# Single-file formats only (``.nhdr``/``.mhd`` pairs are not written atomically, so a resumed batch could not
# trust them); a DICOM series folder is renamed into place whole.
OUT_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom": ""}
_FROM_INPUT = {"nrrd": ".nrrd", "metaimage": ".mha", "dicom": ""}


def output_suffix(run: LoadedRun, out_format: str, source: Path | None = None) -> str:
    """The suffix of a batch output (``""``: a DICOM series folder) for ``out_format`` (see :data:`OUT_FORMATS`).

    ``input`` takes ``source``'s format (``.nii``/``.nii.gz`` kept, ``.nhdr`` -> ``.nrrd``, ``.mhd`` ->
    ``.mha``); a DICOM series input of a run that is not ``data.intensity: ct`` gets NIfTI (a DICOM output is a
    CT series in HU). Without ``source``: the format is only checked (``.nii.gz`` for ``input``).

    Raises:
        ConfigError: an unknown format, ``dicom`` for a run that is not ``data.intensity: ct``, ``input``
            for unconditional samples.
    """
    ct = run.config.data.intensity == "ct"
    if out_format == "input":
        if not run.sources:
            raise ConfigError("--out-format input: unconditional samples have no input; use nifti, nrrd, mha or dicom")
        if source is None:
            return OUT_FORMATS["nifti"]
        kind = image_format(source)
        if kind == "nifti":
            return volume_suffix(source.name) or OUT_FORMATS["nifti"]
        return OUT_FORMATS["nifti"] if kind == "dicom" and not ct else _FROM_INPUT[kind]
    if out_format not in OUT_FORMATS:
        raise ConfigError(f"--out-format: expected one of {'|'.join([*OUT_FORMATS, 'input'])}, got {out_format!r}")
    if out_format == "dicom" and not ct:
        raise ConfigError("--out-format dicom: only data.intensity: ct runs write DICOM series (CT, in HU); "
                          "use nifti, nrrd or mha")
    return OUT_FORMATS[out_format]


@dataclasses.dataclass
class BatchResult:
    """What a batch did: files written, names skipped (already done) and failed (name -> one-line reason)."""

    out_dir: Path
    written: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        done = f"{len(self.written)} file(s) written, {len(self.skipped)} already done"
        return f"{done}, {len(self.failed)} failed" if self.failed else done


def _reason(err: BaseException) -> str:
    """One line: an IDM3DError's message, else the exception type and the first line of its message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if isinstance(err, IDM3DError) else f"{type(err).__name__}: {text}".rstrip(": ")


class _Manifest:
    """``<out>/samples.json``, kept up to date after each output so an interrupted batch keeps its records."""

    def __init__(self, out_dir: Path, run: LoadedRun, kind: str, out_format: str = "nifti") -> None:
        self.path = out_dir / MANIFEST
        sc = run.settings
        self.doc: dict[str, Any] = {
            "run": str(run.run_dir), "checkpoint": str(run.checkpoint), "step": run.state.step, "weights": run.weights,
            "kind": kind, "out_format": out_format, "sampler": sc.sampler, "steps": sc.steps, "eta": sc.eta,
            "precision": sc.precision,
            "outputs": {},
        }
        if self.path.is_file():  # resuming: keep what earlier invocations recorded
            with contextlib.suppress(ValueError, AttributeError):  # unreadable: rewritten from what is done now
                self.doc["outputs"] = dict(json.loads(self.path.read_text(encoding="utf-8")).get("outputs", {}))

    def add(self, name: str, entry: dict[str, Any]) -> None:
        self.doc["outputs"][name] = entry
        atomic_write_text(self.path, dumps(self.doc, indent=2))


def _run_batch(
    run: LoadedRun,
    out_dir: Path,
    items: Sequence[tuple[str, dict[str, Any]]],
    suffix: Callable[[str], str],
    make: Callable[[str, dict[str, Any], Path], list[Path]],
    manifest: _Manifest,
    problems: dict[str, str],
    progress: bool,
) -> BatchResult:
    result = BatchResult(out_dir, failed=dict(problems))
    for name, why in problems.items():
        tqdm.write(f"idm3d: error: {name}: {why}", file=sys.stderr)
    bar = tqdm(total=len(items), unit="case", dynamic_ncols=True, disable=not progress)
    try:
        for name, entry in items:
            bar.set_postfix_str(name, refresh=False)
            try:
                out = out_dir / f"{name}{suffix(name)}"  # with out_format input: the case's source format
                # An existing output is complete: files and DICOM folders are moved into place whole.
                done = all(p.exists() for p in output_paths(out, run.targets, dicom=True)[0])
                written = [] if done else make(name, entry, out)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # one bad case must not lose the others
                result.failed[name] = _reason(err)
                tqdm.write(f"idm3d: error: {name}: {result.failed[name]}", file=sys.stderr)
            else:
                if done:
                    result.skipped.append(name)
                else:
                    result.written.extend(written)
                    manifest.add(name, {**entry, "files": [p.name for p in written]})
            bar.update(1)
    finally:
        bar.close()
    return result


def sample_folder(
    run: LoadedRun, input_dir: str | Path, out_dir: str | Path, *, progress: bool = True, out_format: str = "nifti"
) -> BatchResult:
    """Translate every case of ``input_dir`` (case folders, modalities found by file-name suffix, as for
    training data) into ``out_dir/<case>_<target>.nii.gz`` (``<case>.nii.gz`` with one target; the suffix
    from ``out_format``, :func:`output_suffix`), each on its case's grid and affine: origin, spacing and
    direction cosines. A case lacking a source modality is reported as failed.

    Raises:
        ConfigError: the run generates unconditionally, ``input_dir`` holds no case at all, or a bad
            ``out_format``.
    """
    if not run.sources:
        raise ConfigError("--input-dir: this run generates unconditionally; use --num N")
    output_suffix(run, out_format)
    out, root = Path(out_dir), Path(input_dir)
    cases, problems = scan_cases(root, run.sources)
    failed: dict[str, str] = {}
    for problem in problems:  # problem.file: a case folder, or input_dir itself
        if not cases and problem.file == root:
            raise ConfigError(f"--input-dir {problem}")
        name = problem.file.name
        failed[name] = f"{failed[name]}; {problem.detail}" if name in failed else problem.detail
    if not cases and not failed:
        raise ConfigError(f"--input-dir {root}: no case holds the sources {run.sources}")
    files = {c.case_id: c.files for c in cases}
    seed = run.settings.seed
    items = [(c.case_id, {"seed": seed, "inputs": {m: str(p) for m, p in c.files.items()}}) for c in cases]
    out.mkdir(parents=True, exist_ok=True)
    manifest = _Manifest(out, run, "translate", out_format)
    first = run.sources[0]
    return _run_batch(run, out, items, lambda name: output_suffix(run, out_format, files[name][first]),
                      lambda name, _e, path: write_sample(run, path, files[name], png=False),
                      manifest, failed, progress)


def sample_many(
    run: LoadedRun, num: int, out_dir: str | Path, *, shape: Sequence[int] | None = None, progress: bool = True,
    out_format: str = "nifti",
) -> BatchResult:
    """``num`` unconditional samples ``out_dir/sample_0000[_<target>].nii.gz`` ... (the suffix from
    ``out_format``, :func:`output_suffix`), sample ``i`` drawn with seed ``sample.seed + i`` (recorded in the
    manifest), so the set is reproducible and extendable.

    Raises:
        ConfigError: the run translates (it needs ``--input-dir``), ``num`` < 1, or a bad ``out_format``.
    """
    if run.sources:
        raise ConfigError(f"--num: this run translates {run.sources} -> {run.targets}; use --input-dir")
    if num < 1:
        raise ConfigError(f"--num: expected a count >= 1, got {num}")
    suffix = output_suffix(run, out_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = run.settings.seed
    items = [(f"sample_{i:04d}", {"seed": base + i}) for i in range(num)]
    manifest = _Manifest(out, run, "generate", out_format)
    return _run_batch(run, out, items, lambda _n: suffix,
                      lambda _n, entry, path: write_sample(run, path, shape=shape, seed=entry["seed"], png=False),
                      manifest, {}, progress)
