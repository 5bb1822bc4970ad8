#!/usr/bin/env bash
# One GPU check of idm3d (issues #6, #17): under ~7 minutes on one H100.
#
#   benchmarks/gpu_check.sh [OUTDIR]            # default OUTDIR: $OUT if set, else runs/gpu_check
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh     # same steps on CPU at tiny sizes (a dry run)
#
# Steps, each bounded by `timeout` so one slow step cannot eat the others' time:
#   1. dependencies: whatever python3 lacks (monai, nibabel, ...) from wheels in .whl/ if present,
#      else from PyPI; idm3d itself runs from src/ (no install needed)
#   2. environment: GPU, driver, versions -> OUTDIR/env.json
#   3. bench memory at 64^3 and 128^3: IDMUNet (memory-efficient, plain) vs MONAI (plain, checkpointed) and
#      PatchDDM-3D (plain, checkpointed), first step and steady state -> memory.jsonl, memory.png;
#      one no-grad denoiser call at 128^3 and 256^3 -> inference.jsonl
#   3b. bench profile at 64^3 (per-module saved bytes and peaks) -> profile.jsonl, profile.png
#   4. a 200-step bf16 training smoke run on synthetic volumes -> train_metrics.jsonl, train_summary.json
#   5. bench max-size up to 256^3 within a budget (IDMUNet vs the checkpointed baselines) -> max_size.jsonl
# Everything printed also goes to OUTDIR/gpu_check.log. Exit status: number of failed steps.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/runs/gpu_check}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/idm3d-gpu-check.XXXXXX")"
LOG="$OUTDIR/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# idm3d runs from src/; missing packages go to $WORK/site, leaving the machine's environment alone.
export PYTHONPATH="$ROOT/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$LOG") 2>&1

if [[ "${GPU_CHECK_DRY:-0}" == "1" ]]; then
    DEVICE=cpu; MEM_SIZES=16; INF_SIZES=16; PROF_SIZE=16; MAX_EDGE=32; BUDGET_GIB=0.4; TRAIN_STEPS=4; PATCH=16
    VOLUME=32; MEM_EXTRA=(--threads 2 --repeats 1 --no-flops); MAX_EXTRA=(--threads 2); T_MEM=900; T_TRAIN=600
    T_MAX=900; T_INF=600; T_PROF=300
else
    # Worst case (every step hitting its timeout) stays under 7 minutes with ~20 s of set-up.
    DEVICE=cuda; MEM_SIZES=64,128; INF_SIZES=128,256; PROF_SIZE=64; MAX_EDGE=256; BUDGET_GIB=24; TRAIN_STEPS=200
    PATCH=64; VOLUME=96; MEM_EXTRA=(--repeats 3); MAX_EXTRA=(); T_MEM=150; T_TRAIN=60; T_MAX=80; T_INF=40
    T_PROF=30
fi
# Each knob can be overridden from the environment.
MEM_SIZES="${GPU_CHECK_SIZES:-$MEM_SIZES}"
MAX_EDGE="${GPU_CHECK_MAX:-$MAX_EDGE}"
BUDGET_GIB="${GPU_CHECK_BUDGET_GIB:-$BUDGET_GIB}"
TRAIN_STEPS="${GPU_CHECK_STEPS:-$TRAIN_STEPS}"

FAILED=0
START=$SECONDS
step() { echo; echo "=== [$((SECONDS - START)) s] $*"; }
fail() { echo "!!! FAILED: $*"; FAILED=$((FAILED + 1)); }

# ------------------------------------------------------------------ 1. dependencies
step "dependencies (device=$DEVICE, outdir=$OUTDIR)"
pip_install() {  # pip_install PIP_NAME...: from carried wheels when present, else the index
    local opts=(-q --no-deps --no-compile --target "$WORK/site")
    if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
        "$PY" -m pip install "${opts[@]}" --no-index --find-links "$ROOT/.whl" "$@"
    else
        "$PY" -m pip install "${opts[@]}" "$@"
    fi
}
if ! "$PY" -c "import torch" 2> /dev/null; then
    "$PY" -m pip install -q torch || fail "pip install torch"
fi
# import name -> pip name; --no-deps everywhere so nothing replaces the machine's torch.
PAIRS=(monai:monai nibabel:nibabel einops:einops safetensors:safetensors yaml:pyyaml tqdm:tqdm matplotlib:matplotlib)
[[ "$DEVICE" == cuda ]] && PAIRS+=(pynvml:nvidia-ml-py)  # energy and temperature, GPU only
for pair in "${PAIRS[@]}"; do
    mod="${pair%%:*}"; pkg="${pair#*:}"
    if ! "$PY" -c "import $mod" 2> /dev/null; then
        echo "installing $pkg"
        pip_install "$pkg" || { [[ "$mod" == pynvml ]] && echo "(energy/temperature fields will be null)" || fail "install $pkg"; }
    fi
done
"$PY" -c "import idm3d, monai, nibabel; print('idm3d from', idm3d.__file__)" || fail "imports"

# ------------------------------------------------------------------ 2. environment
step "environment"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" - "$OUTDIR/env.json" "$DEVICE" << 'EOF' || fail "environment"
import json, sys
import monai, torch
from idm3d.bench.harness import machine_info
info = machine_info(sys.argv[2])
info.update(monai=monai.__version__, cuda_available=torch.cuda.is_available(),
            bf16_supported=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
if sys.argv[2] == "cuda" and not torch.cuda.is_available():
    sys.exit("CUDA requested but torch.cuda.is_available() is False")
EOF

# ------------------------------------------------------------------ 3. memory benchmark
step "bench memory at $MEM_SIZES ($DEVICE)"
NETS=idm,idm-plain,monai,monai-ckpt,patchddm,patchddm-ckpt,conv-stack
timeout "$T_MEM" "$PY" -m idm3d bench memory --sizes "$MEM_SIZES" --nets "$NETS" \
    --device "$DEVICE" ${MEM_EXTRA[@]+"${MEM_EXTRA[@]}"} --json-out "$OUTDIR/memory.jsonl" --plot "$OUTDIR/memory.png" \
    || fail "bench memory (exit $?)"
step "bench memory --inference at $INF_SIZES ($DEVICE)"
timeout "$T_INF" "$PY" -m idm3d bench memory --inference --sizes "$INF_SIZES" --nets idm,monai,patchddm \
    --device "$DEVICE" ${MEM_EXTRA[@]+"${MEM_EXTRA[@]}"} --json-out "$OUTDIR/inference.jsonl" \
    || fail "bench memory --inference (exit $?)"
step "bench profile at ${PROF_SIZE}^3 ($DEVICE)"
timeout "$T_PROF" "$PY" -m idm3d bench profile --size "$PROF_SIZE" --device "$DEVICE" \
    --json-out "$OUTDIR/profile.jsonl" --plot "$OUTDIR/profile.png" || fail "bench profile (exit $?)"

# ------------------------------------------------------------------ 4. bf16 training smoke run
step "training smoke run: $TRAIN_STEPS steps, bf16, ${PATCH}^3 patches"
"$PY" - "$WORK/data" "$VOLUME" << 'EOF' || fail "synthetic data"
# Five synthetic "heads": a smooth ellipsoid with noisy texture, so every case passes the data checks.
import sys
from pathlib import Path
import nibabel as nib
import numpy as np
root, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij"))
for i in range(5):
    radii = rng.uniform(0.6, 0.85, size=(3, 1, 1, 1))
    inside = ((grid / radii) ** 2).sum(0) < 1
    vol = inside * (100 + 20 * np.sin(4 * grid[0] + i) + rng.normal(0, 5, (n, n, n)))
    (root / f"case{i}").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), root / f"case{i}" / "t1.nii.gz")
print(f"wrote 5 cases of {n}^3 under {root}")
EOF
timeout "$T_TRAIN" "$PY" -m idm3d train --out "$WORK/train" \
    --set data.root="$WORK/data" --set "data.targets=[t1]" --set "data.patch_size=[$PATCH,$PATCH,$PATCH]" \
    --set data.test_fraction=0.2 --set data.val_fraction=0.0 --set train.max_steps="$TRAIN_STEPS" \
    --precision bf16 --set train.device="$DEVICE" --set train.progress=false \
    --set train.log_every=10 --set train.checkpoint_every=100 \
    || fail "idm3d train (exit $?)"
if [[ -f "$WORK/train/metrics.jsonl" ]]; then
    cp "$WORK/train/metrics.jsonl" "$OUTDIR/train_metrics.jsonl"
    "$PY" - "$WORK/train/metrics.jsonl" "$OUTDIR/train_summary.json" "$TRAIN_STEPS" << 'EOF' || fail "training summary"
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
steps = [r for r in rows if isinstance(r.get("loss"), (int, float))]
summary = {
    "records": len(rows),
    "last_step": max((r.get("step", 0) for r in rows), default=0),
    "first_loss": steps[0]["loss"] if steps else None,
    "last_loss": steps[-1]["loss"] if steps else None,
    "all_finite": all(math.isfinite(r["loss"]) for r in steps),
    "steps_per_s": steps[-1].get("steps_per_s") if steps else None,
    "max_mem_mb": max((r.get("mem_mb") or 0 for r in rows), default=None),
}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps(summary))
if not steps or not summary["all_finite"] or summary["last_step"] < int(sys.argv[3]):
    sys.exit(f"training smoke run incomplete or non-finite: {summary}")
EOF
else
    fail "no metrics.jsonl from the training run"
fi

# ------------------------------------------------------------------ 5. largest trainable cube
step "bench max-size up to ${MAX_EDGE}^3 within $BUDGET_GIB GiB ($DEVICE)"
timeout "$T_MAX" "$PY" -m idm3d bench max-size --budget-gib "$BUDGET_GIB" --max "$MAX_EDGE" \
    --nets idm,monai-ckpt,patchddm-ckpt \
    --device "$DEVICE" ${MAX_EXTRA[@]+"${MAX_EXTRA[@]}"} --timeout 60 --json-out "$OUTDIR/max_size.jsonl" \
    || fail "bench max-size (exit $?)"

step "done in $((SECONDS - START)) s, $FAILED failed step(s); results in $OUTDIR"
ls -la "$OUTDIR"
rm -rf "$WORK"
exec 1>&- 2>&-
wait  # let tee finish writing the log before the caller collects OUTDIR
exit "$FAILED"
