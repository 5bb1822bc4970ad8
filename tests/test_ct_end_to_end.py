"""CT through the CLI: data check on every format, training in HU, samples written on the input's geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ct_fixtures import BONE, ct_phantom, write_ct_folder, write_dicom_series, write_itk
from helpers import tiny_run_config, torch_threads
from idm3d.cli.main import main
from idm3d.data.preprocess import PreprocessConfig, preprocess_case
from idm3d.data.readers import load_image, save_image
from idm3d.errors import ConfigError
from idm3d.runs.config import load_config

SHAPE = (24, 20, 12)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _config(root: Path, **data) -> dict:
    data = {"root": str(root), "targets": ["ct"], "intensity": "ct", "patch_size": [8, 8, 8], "test_fraction": 0.25,
            **data}
    return tiny_run_config(data, {"max_steps": 2}, diffusion={"num_train_timesteps": 20})


def test_round_trip_read_preprocess_inverse_write_read(tmp_path: Path):
    hu = np.clip(ct_phantom(SHAPE), -1000, 1000)  # inside the window: the mapping is invertible
    source = write_dicom_series(tmp_path / "scan", hu)
    data, affine = load_image(source)
    config = PreprocessConfig(intensity="ct", window=(-1000.0, 1000.0), foreground="body", divisible_by=8)
    record = preprocess_case({"ct": data}, affine, config, case_id="scan")
    assert float(record.image.min()) >= -1.0
    assert float(record.image.max()) <= 1.0
    for out in ("back.nrrd", "back.mha", "back_dicom"):
        written = save_image(tmp_path / out, record.to_original(record.channel("ct"), "ct"), record.original_affine)
        again, again_affine = load_image(written)
        np.testing.assert_allclose(again_affine, affine, atol=1e-9)
        # float32 in [-1, 1] -> HU: well inside the 1 HU quantisation step of the DICOM output
        np.testing.assert_allclose(again, hu, atol=0.5 if out.endswith("dicom") else 1e-3)


def test_anisotropic_working_spacing_goes_back_onto_the_input_grid(tmp_path: Path):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    smooth = (400.0 * np.exp(-(x**2 + y**2 + z**2)) - 300.0).astype(np.float32)  # no edges: interpolation is exact-ish
    path = write_itk(tmp_path / "smooth.nrrd", smooth)
    data, affine = load_image(path)
    config = PreprocessConfig(intensity="ct", foreground="none", spacing=(0.5, 0.6, 1.25), divisible_by=8)
    record = preprocess_case({"ct": data}, affine, config)
    zooms = np.linalg.norm(record.affine[:3, :3], axis=0)
    np.testing.assert_allclose(zooms, (0.5, 0.6, 1.25), atol=1e-6)
    back = record.to_original(record.channel("ct"), "ct")
    assert back.shape == SHAPE
    inner = (slice(2, -2),) * 3  # away from the border, where bilinear resampling of the edge voxels differs
    np.testing.assert_allclose(back[inner], smooth[inner], atol=15.0)


@pytest.mark.parametrize(("key", "value", "text"), [
    ("data.intensity", "hu", "data.intensity: expected one of percentile|ct"),
    ("data.window", "[1000, -1000]", "data.window: expected [lower, upper]"),
    ("data.window", "[0]", "data.window: expected [lower, upper]"),
    ("data.foreground", "lungs", "data.foreground: expected one of auto|brain|body|none"),
    ("data.foreground", "body", "data.foreground: body thresholds Hounsfield units"),
])
def test_intensity_options_fail_in_one_line_naming_the_key(tmp_path: Path, key, value, text):
    overrides = [f"{key}={value}", "data.root=/x", "data.targets=[ct]"]
    if key == "data.foreground" and value == "body":
        overrides.append("data.intensity=percentile")
    with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("|", r"\|")):
        load_config(None, overrides)


def test_demo_data_refuses_ct_intensity():
    with pytest.raises(ConfigError, match=r"data\.intensity: the demo data"):
        load_config(None, ["data.intensity=ct"])


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ct")
    root = write_ct_folder(base / "data", shape=SHAPE)
    cfg = base / "ct.yaml"
    cfg.write_text(yaml.safe_dump(_config(root)))
    run = base / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    return root, run


def test_data_check_accepts_every_format_and_rejects_a_broken_series(tmp_path: Path, capsys):
    root = write_ct_folder(tmp_path / "data", shape=SHAPE)
    rc, out, _ = _run(capsys, "data", "check", root, "--modalities", "ct")
    assert rc == 0, out
    assert out.startswith("OK: 4 case(s)")
    sorted((root / "case00" / "case00_ct").iterdir())[4].unlink()
    rc, out, _err = _run(capsys, "data", "check", root, "--modalities", "ct")
    assert rc == 2
    assert out.strip().splitlines() == [out.strip()]
    assert out.startswith(f"{root / 'case00' / 'case00_ct'}: 1 slice(s) missing")


def test_unconditional_ct_trains_and_samples_in_hu(ct_run, tmp_path: Path, capsys):
    _root, run = ct_run
    info = yaml.safe_load((run / "data.json").read_text())
    assert info["scalings"]["ct"] == {"lo": -1000.0, "hi": 1000.0}
    for name in ("s.nii.gz", "s.mha", "s_dicom"):
        rc, _, err = _run(capsys, "sample", "--run", run, "--out", tmp_path / name, "--device", "cpu")
        assert rc == 0, err
        data, affine = load_image(tmp_path / name)
        assert data.min() >= -1000.5
        assert data.max() <= 1000.5
        assert data.max() - data.min() > 100  # HU, not [-1, 1]
        np.testing.assert_allclose(affine, info["grid_affine"], atol=1e-6)


def test_mri_run_refuses_a_dicom_output_name(tmp_path: Path):
    from idm3d.inference.generate import output_paths

    with pytest.raises(ConfigError, match="--out"):
        output_paths(tmp_path / "folder", ["t1"])
    assert output_paths(tmp_path / "folder", ["ct"], dicom=True)[0] == [tmp_path / "folder"]


def test_translation_writes_on_the_dicom_input_geometry(tmp_path: Path, capsys):
    root = tmp_path / "data"
    for i in range(3):
        case = root / f"case{i}"
        hu = ct_phantom(SHAPE, seed=i)
        write_dicom_series(case / f"case{i}_ct", hu)
        contrast = np.where(hu > 0, np.minimum(hu + 60, BONE), hu)  # "contrast-enhanced" soft tissue
        write_itk(case / f"case{i}_ctc.nrrd", contrast)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(root, task="translate", sources=["ct"], targets=["ctc"],
                                          test_fraction=0.34)))
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(run)]) == 0
    condition = root / "case0" / "case0_ct"
    _, in_affine = load_image(condition)
    for name in ("t.nrrd", "t_dicom"):
        rc, _, err = _run(capsys, "sample", "--run", run, "--condition", condition, "--out", tmp_path / name,
                          "--device", "cpu")
        assert rc == 0, err
        data, affine = load_image(tmp_path / name)
        assert data.shape == SHAPE
        np.testing.assert_allclose(affine, in_affine, atol=1e-6)
        assert data.min() >= -1000.5
        assert torch.isfinite(torch.as_tensor(data)).all()
