#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs beyond the GPU machine's own torch, for a machine with no network.
#
#   benchmarks/gpu_wheels.sh [DEST] [PACKAGE...]    # default DEST: .whl/ (git-ignored); default: the list below
#
# Run it here, where PyPI is reachable; then hand .whl/ to the run (the device tool's carry: [".whl"]).
# gpu_check.sh installs from it with `pip install --no-index --find-links .whl` into a venv over the system
# site-packages, so the machine's CUDA torch stays. torch and its nvidia-* wheels are not downloaded
# (gigabytes; the machine has them): pip download would pull them in as monai's dependency, so the
# dependency closure is taken without them (`--no-deps` on an explicit list).
# Target: CPython $GPU_PY (default 3.11) on manylinux2014 x86_64 (the list must match the machine's Python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
shift || true
PY="${PYTHON:-python3}"
GPU_PY="${GPU_PY:-3.11}"
# idm3d's runtime dependencies (pyproject.toml) but torch, pytest for the exactness step, nvidia-ml-py for
# energy and temperature, and every dependency of those (no torch among them).
PACKAGES=(
    monai nibabel einops safetensors pyyaml tqdm matplotlib nvidia-ml-py pytest numpy
    # matplotlib's
    contourpy cycler fonttools kiwisolver packaging pillow pyparsing python-dateutil six
    # pytest's
    iniconfig pluggy
    # nibabel's (importlib-resources only below 3.12)
    importlib-resources typing-extensions
)
[[ $# -gt 0 ]] && PACKAGES=("$@")
mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PY" --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    --dest "$DEST" "${PACKAGES[@]}"
echo "$(find "$DEST" -name '*.whl' | wc -l) wheels in $DEST ($(du -sh "$DEST" | cut -f1)); carry it with the run"
