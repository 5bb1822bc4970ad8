"""``idm3d detect``: features, detectors, statistics and the CLI end to end on tiny trained runs (CPU, <= 32^3)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression

from helpers import tiny_run_config, write_brats_folder, write_volume
from idm3d.cli.main import main
from idm3d.data.nifti import load_volume, save_volume
from idm3d.data.preprocess import preprocess_case
from idm3d.detect.core import FeatureTable, evaluate, extract
from idm3d.detect.detector import Supervised, ZeroShot, gradient_boosting, out_of_fold
from idm3d.detect.inputs import read_inputs
from idm3d.detect.stats import auroc, auroc_with_ci
from idm3d.diffusion.detection import FEATURE_NAMES, detection_features, noise_statistics
from idm3d.errors import ConfigError
from idm3d.runs.data_source import preprocess_config
from idm3d.runs.load import build_scheduler, load_run

SHAPE = (24, 24, 24)


def _config(root: Path, task: str = "translate") -> dict:
    data = {"root": str(root), "task": task, "sources": ["t1"] if task == "translate" else [], "targets": ["t2"]}
    return tiny_run_config(data, {"checkpoint_every": 3})


def _train(base: Path, task: str) -> tuple[Path, Path]:
    root = write_brats_folder(base / "data", n_cases=4, shape=SHAPE, modalities=("t1", "t2"))
    cfg = base / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(root, task)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--config", str(cfg), "--out", str(base / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, base / "run"


def _real(root: Path, modality: str = "t2") -> list[Path]:
    return sorted(root.glob(f"*/*_{modality}.nii.gz"))


@pytest.fixture(scope="module")
def translation(tmp_path_factory) -> dict:
    """A 3-step T1 -> T2 run, the 4 real T2s and 4 fakes written by `idm3d sample` (with their T1 next to them)."""
    base = tmp_path_factory.mktemp("detect")
    root, run = _train(base, "translate")
    fakes = []
    for i, t1 in enumerate(_real(root, "t1")):
        folder = base / "fake"
        folder.mkdir(exist_ok=True)
        src = folder / f"case{i}_t1.nii.gz"
        src.write_bytes(t1.read_bytes())
        out = folder / f"case{i}_t2.nii.gz"
        assert main(["sample", "--run", str(run), "--condition", str(src), "--out", str(out), "--no-progress"]) == 0
        fakes.append(out)
    return {"root": root, "run": run, "real": _real(root), "fake": fakes, "base": base}


# ------------------------------------------------------------------------------------------- features


def test_noise_statistics_tell_white_noise_from_smooth_noise():
    gen = torch.Generator().manual_seed(0)
    white = noise_statistics(torch.randn(1, 1, 32, 32, 32, generator=gen))
    assert abs(white["noise_autocorr"]) < 0.02
    assert abs(white["noise_kurtosis"]) < 0.1
    assert abs(white["noise_log_std"]) < 0.02
    assert all(abs(white[f"noise_band{k}_log_ratio"]) < 0.1 for k in range(4))
    smooth = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 34, 34, 34, generator=gen), 3, stride=1)
    stats = noise_statistics(smooth / smooth.std())
    assert stats["noise_autocorr"] > 0.5
    assert stats["noise_band0_log_ratio"] > 1.0 > -0.5 > stats["noise_band3_log_ratio"]


def test_features_are_deterministic_and_named(translation):
    run = load_run(translation["run"], device="cpu")
    item = read_inputs(run, translation["real"][:1])[0]

    def sched():
        return build_scheduler(run.config, "ddim", 2)

    a = detection_features(run.pipeline, item.target, item.condition, scheduler=sched(), mask=item.mask)
    b = detection_features(run.pipeline, item.target, item.condition, scheduler=sched(), mask=item.mask)
    assert list(a) == list(FEATURE_NAMES)
    assert a == b
    assert all(np.isfinite(list(a.values())))
    c = detection_features(run.pipeline, item.target, item.condition, scheduler=sched(), mask=item.mask, seed=1)
    assert c["onestep_eps_mse"] != a["onestep_eps_mse"]  # the seed is the residual's noise, and only that
    assert c["dire_l1"] == a["dire_l1"]


# ------------------------------------------------------------------------------------------- statistics


def test_auroc_on_known_inputs():
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # 3 of the 4 (real, fake) pairs
    assert auroc([0, 1, 0, 1], [0.0, 1.0, 0.0, 1.0]) == 1.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    perfect = auroc_with_ci([0] * 10 + [1] * 10, list(range(20)), n_boot=200)
    assert (perfect["auroc"], perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    ci = auroc_with_ci(labels, rng.normal(size=200) + labels, n_boot=500)
    assert ci["ci_low"] < ci["auroc"] < ci["ci_high"]
    assert 0.70 < ci["auroc"] < 0.85  # the AUROC of N(1, 1) against N(0, 1) is Phi(1/sqrt 2) = 0.760
    # a group bootstrap resamples whole groups: pairs of identical rows widen nothing but cannot split
    grouped = auroc_with_ci(np.tile(labels, 2), np.tile(rng.normal(size=200) + labels, 2),
                            groups=np.tile(np.arange(200), 2), n_boot=500)
    assert grouped["ci_high"] - grouped["ci_low"] > ci["ci_high"] - ci["ci_low"] - 0.05
    with pytest.raises(ValueError, match="labels: need both"):
        auroc([0, 0], [1.0, 2.0])


def _table(shift: float, n: int = 30, seed: int = 0) -> FeatureTable:
    rng = np.random.default_rng(seed)
    f = len(FEATURE_NAMES)
    x = np.concatenate([rng.normal(size=(n, f)), rng.normal(size=(n, f)) + shift * (np.arange(f) % 3 == 0)])
    labels = np.repeat([0, 1], n)
    groups = [f"v{i % n}" for i in range(2 * n)]  # a real volume and "its" fake share a group
    return FeatureTable([f"r{i}" for i in range(2 * n)], x, labels, groups, ["real"] * n + ["gen"] * n,
                        [0.0] * (2 * n))


def test_detectors_separate_shifted_features_but_shuffled_labels_give_half():
    table = _table(shift=3.0)
    true = evaluate(table, n_boot=100)["detectors"]
    assert true["zero_shot"]["auroc"] > 0.95
    assert true["logistic"]["auroc"] > 0.95
    assert true["gradient_boosting"]["auroc"] > 0.9
    rng = np.random.default_rng(1)
    shuffled = []
    for _ in range(8):
        t = _table(shift=3.0)
        t.labels = rng.permutation(t.labels)
        shuffled.append([evaluate(t, n_boot=50, transfer=False)["detectors"][k]["auroc"]
                         for k in ("zero_shot", "logistic", "gradient_boosting")])
    shuffled = np.asarray(shuffled)
    assert abs(shuffled.mean() - 0.5) < 0.08
    assert shuffled.max() < 0.8


def test_zero_shot_never_sees_a_generated_volume():
    table = _table(shift=3.0)
    other = _table(shift=3.0)
    other.features[other.labels == 1] = 100.0  # any fakes at all
    fit = lambda x, y: ZeroShot.fit(x[y == 0])  # noqa: E731
    a = out_of_fold(fit, table.features, table.labels, table.groups)
    b = out_of_fold(fit, other.features, other.labels, other.groups)
    assert np.array_equal(a[table.labels == 0], b[other.labels == 0])


def test_fitted_detectors_round_trip_through_json():
    table = _table(shift=2.0)
    zero, sup = ZeroShot.fit(table.features[:30]), Supervised.fit(table.features, table.labels)
    again = ZeroShot.from_dict(json.loads(json.dumps(zero.to_dict())))
    assert np.allclose(again.score(table.features), zero.score(table.features))
    sup2 = Supervised.from_dict(json.loads(json.dumps(sup.to_dict())))
    assert np.allclose(sup2.score(table.features), sup.score(table.features))
    assert 0 <= sup.score(table.features).min() <= sup.score(table.features).max() <= 1


def test_the_supervised_detectors_transfer_to_a_generator_that_leaves_the_reals_the_other_way():
    # Two generators whose fakes deviate from the reals in opposite directions of the same features: a
    # boundary on the signed features fitted on A's fakes calls B's fakes "more real than real"; one on
    # how far a volume lies from the reals catches both.
    rng = np.random.default_rng(0)
    f, n = len(FEATURE_NAMES), 40
    shift = 3.0 * (np.arange(f) % 3 == 0)
    real, fake_a, fake_b = (rng.normal(size=(n, f)) + k * shift for k in (0.0, 1.0, -1.0))
    x_fit, y_fit = np.concatenate([real[:20], fake_a[:20]]), np.repeat([0, 1], 20)
    x_test, y_test = np.concatenate([real[20:], fake_b[20:]]), np.repeat([0, 1], 20)
    fitted = Supervised.fit(x_fit, y_fit)
    assert auroc(y_test, fitted.score(x_test)) > 0.95
    assert auroc(y_test, gradient_boosting(0)(x_fit, y_fit).score(x_test)) > 0.95
    signed = LogisticRegression(max_iter=5000).fit(x_fit, y_fit)
    assert auroc(y_test, signed.decision_function(x_test)) < 0.1  # what the signed features did


def test_a_detector_json_with_signed_features_still_scores_as_written():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, len(FEATURE_NAMES)))
    old = {"mean": [0.5] * x.shape[1], "scale": [2.0] * x.shape[1], "coef": list(np.linspace(-1, 1, x.shape[1])),
           "intercept": 0.25}  # the format before the distance features: no "features" key
    logit = ((x - 0.5) / 2.0) @ np.asarray(old["coef"]) + 0.25
    assert np.allclose(Supervised.from_dict(old).score(x), 1 / (1 + np.exp(-logit)))
    new = Supervised.from_dict(json.loads(json.dumps(Supervised.fit(x, np.array([0, 0, 0, 1, 1, 1])).to_dict())))
    assert new.zero_shot is not None
    with pytest.raises(ValueError, match="unknown features 'squared'"):
        Supervised.from_dict({**old, "features": "squared"})


# ------------------------------------------------------------------------------------------- CLI


def test_detect_cli_writes_the_report_and_score_reads_the_detector(translation, tmp_path: Path, capsys):
    out = tmp_path / "det"
    args = ["detect", "--run", str(translation["run"]), "--real", *map(str, translation["real"]),
            "--fake", *map(str, translation["fake"]), "--out", str(out), "--bootstrap", "100", "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["n_real"], report["n_fake"]) == (4, 4)
    assert set(report["evaluation"]["detectors"]) == {"zero_shot", "logistic", "gradient_boosting"}
    assert set(report["evaluation"]["feature_auroc"]) == set(FEATURE_NAMES)
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AUROC" in (out / "report.md").read_text()
    capsys.readouterr()
    files = [str(translation["fake"][0]), str(translation["real"][0])]
    assert main(["detect", "score", "--run", str(translation["run"]), "--detector", str(out), *files, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == files
    assert all(0 <= r["probability_generated"] <= 1 and r["zero_shot"] >= 0 for r in rows)
    # the same volume scored by the fitted detector and by the report's out-of-fold pass share features
    features = {line.split(",")[0]: line for line in (out / "features.csv").read_text().splitlines()[1:]}
    assert set(features) == {*map(str, translation["real"]), *map(str, translation["fake"])}


def test_resaving_a_real_volume_as_fakes_are_saved_keeps_its_score(translation, tmp_path: Path):
    """generate.sample writes a fake as scaling.inverse -> record.to_original -> save_volume; do that to a real."""
    run = load_run(translation["run"], device="cpu")
    t2, t1 = translation["real"][0], _real(translation["root"], "t1")[0]
    (data2, affine), (data1, _) = load_volume(t2), load_volume(t1)
    record = preprocess_case({"t1": data1, "t2": data2}, affine, preprocess_config(run.config))
    resaved = tmp_path / "resaved_t2.nii.gz"
    save_volume(resaved, record.to_original(record.scalings["t2"].inverse(record.channel("t2"))),
                record.original_affine)
    (tmp_path / "resaved_t1.nii.gz").write_bytes(t1.read_bytes())
    kinds = {nib.load(str(resaved)).get_data_dtype(), nib.load(str(translation["fake"][0])).get_data_dtype()}
    assert len(kinds) == 1  # written like the fakes
    rows = extract(run, read_inputs(run, [t2, resaved]), 0).features
    spread = np.abs(extract(run, read_inputs(run, translation["real"][1:3]), 0).features - rows[0]).max(0)
    # the re-saved copy stays far closer to the original than any other real volume is, in every feature
    assert np.all(np.abs(rows[1] - rows[0]) <= 0.1 * spread + 1e-6)


@pytest.mark.parametrize("fault", ["not_a_volume", "wrong_modality", "wrong_grid", "empty", "voxel_size"])
def test_bad_inputs_are_one_line_naming_the_file(translation, tmp_path: Path, capsys, fault: str):
    run = str(translation["run"])
    real = [str(p) for p in translation["real"]]
    t1 = str(_real(translation["root"], "t1")[0])
    if fault == "not_a_volume":
        bad = tmp_path / "notes_t2.txt"
        bad.write_text("hello")
        args, named = ["score", "--run", run, str(bad), "--real", *real], f"{bad}: not a volume"
    elif fault == "wrong_modality":
        args, named = ["score", "--run", run, t1, "--real", *real], "named as a t1 volume"
    elif fault == "wrong_grid":
        bad = write_volume(tmp_path / "small_t2.nii.gz", np.random.default_rng(0).random((20, 24, 24)) + 1)
        args, named = ["score", "--run", run, str(bad), "--condition", t1, "--real", *real], f"{bad}: grid"
    elif fault == "voxel_size":
        bad = tmp_path / "big_t2.nii.gz"
        save_volume(bad, load_volume(real[0])[0], np.diag([2.0, 2.0, 2.0, 1.0]))
        save_volume(tmp_path / "big_t1.nii.gz", load_volume(t1)[0], np.diag([2.0, 2.0, 2.0, 1.0]))
        args, named = ["score", "--run", run, str(bad), "--real", *real], f"{bad}: voxel size"
    else:
        args, named = ["score", "--run", run, "--real", *real], "FILE: expected at least one volume"
    assert main(["detect", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idm3d: error: ")
    assert named in err
    assert "\n" not in err


def test_a_run_without_weights_and_a_missing_option_are_one_line(translation, tmp_path: Path, capsys):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.yaml").write_text((translation["run"] / "config.yaml").read_text())
    real = [str(p) for p in translation["real"]]
    assert main(["detect", "score", "--run", str(empty), real[0], "--real", *real]) == 2
    err = capsys.readouterr().err.strip()
    assert "no complete checkpoint" in err
    assert str(empty) in err
    assert "\n" not in err
    assert main(["detect", "--run", str(translation["run"]), "--real", *real, "--out", str(tmp_path)]) == 2
    assert "--fake: required" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--real: expected at least one"):
        read_inputs(load_run(translation["run"], device="cpu"), [], option="--real")


def test_unconditional_run(tmp_path: Path, capsys):
    root, run = _train(tmp_path, "generate")
    fakes = []
    for seed in range(3):
        out = tmp_path / "fake" / f"gen{seed}_t2.nii.gz"
        assert main(["sample", "--run", str(run), "--out", str(out), "--seed", str(seed), "--no-progress"]) == 0
        fakes.append(str(out))
    real = [str(p) for p in _real(root)]
    assert main(["detect", "--run", str(run), "--real", *real, "--fake", *fakes, "--out", str(tmp_path / "det"),
                 "--bootstrap", "50", "--no-progress"]) == 0
    report = json.loads((tmp_path / "det" / "report.json").read_text())
    assert (report["n_real"], report["n_fake"]) == (4, 3)
    assert main(["detect", "score", "--run", str(run), fakes[0], "--condition", real[0], "--real", *real]) == 2
    assert "takes no condition" in capsys.readouterr().err
