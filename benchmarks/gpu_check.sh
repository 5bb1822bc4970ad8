#!/usr/bin/env bash
# One GPU check of idm3d (issues #6, #17, #28): at most 8 minutes of device time on one H100/H200.
#
#   benchmarks/gpu_check.sh [OUTDIR]                  # default OUTDIR: $OUT if set, else runs/gpu_check
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh OUTDIR    # the same steps on CPU at tiny sizes (tests/test_gpu_check_dry.py)
#
# Run from a checkout; idm3d runs from src/ and the lab from benchmarks/ (PYTHONPATH), nothing is installed
# into the machine's Python. Steps, each bounded by `timeout` (seconds on the GPU: 450 s in all, plus at most
# 2 s of kill grace per step, 472 s <= 480 s even if every step hit its limit):
#    20  1. dependencies: what python3 lacks (monai, nibabel, pytest, nvidia-ml-py, ...) into a venv over the
#           system site-packages (its torch kept), from the wheels in .whl/ when present (benchmarks/gpu_wheels.sh)
#    10  2. environment: GPU, driver, torch, CUDA, cuDNN -> env.json
#    45  3. exactness first: pytest -m cuda on tests/test_exactness_devices.py and tests/test_device_gates.py
#           (memory-efficient = plain gradients fp64, round trips, SlabConv3d, batched solve, bf16 autocast)
#   130  4. memory: one training step at 64^3, 128^3, 256^3, IDMUNet (memory-efficient, plain) against the
#           checkpointed MONAI and PatchDDM-3D: peak, step time, energy per step and temperature (NVML)
#           -> memory.jsonl, memory.png
#    45  5. inference: one no-grad denoiser call at 64^3, 128^3, 256^3 (IDMUNet, MONAI, PatchDDM-3D) -> inference.jsonl
#    30  6. bf16: the step of 4. under bf16 autocast at 128^3 and 256^3 (IDMUNet, checkpointed MONAI) -> memory_bf16.jsonl
#    10  7. five synthetic 96^3 volumes; 55: a 200-step bf16 training run on them (idm3d train, 64^3 patches);
#     5     its summary -> train_metrics.jsonl, train_summary.json
#    90  8. max-size: the largest of 256^3, 320^3, 384^3 each net trains within 76 GiB -> max_size.jsonl
#    10  9. summary: gpu_check.json (GPU, driver, torch, every step's status, the issue-28 goals) and SUMMARY.md
# Every step runs even when an earlier one failed; everything printed also goes to OUTDIR/gpu_check.log.
# Exit status: the number of failed steps.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/runs/gpu_check}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/idm3d-gpu-check.XXXXXX")"
LOG="$OUTDIR/gpu_check.log"
STEPS="$OUTDIR/steps.jsonl"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$STEPS"
exec > >(tee -a "$LOG") 2>&1
cd "$ROOT" || exit 1

if [[ "${GPU_CHECK_DRY:-0}" == "1" ]]; then
    # fewer configurations than on the GPU (each is a fresh process importing torch and MONAI), the same steps
    DEVICE=cpu; MARK="not cuda"; MEM_SIZES=16; INF_SIZES=16; BF16_SIZES=16; MAX_SIZES=16; BUDGET_GIB=0.5
    MEM_NETS=idm,idm-plain,monai-ckpt; INF_NETS=idm; BF16_NETS=idm; MAX_NETS=idm; REPEATS=0
    TRAIN_STEPS=4; PATCH=16; VOLUME=24; EXTRA=(--threads 1); CFG_TIMEOUT=120
    T_DEPS=300; T_ENV=60; T_TESTS=120; T_MEM=300; T_INF=120; T_BF16=120; T_DATA=60; T_TRAIN=180; T_TSUM=60
    T_MAX=120; T_SUM=60
else
    DEVICE=cuda; MARK="cuda"; MEM_SIZES=64,128,256; INF_SIZES=64,128,256; BF16_SIZES=128,256; MAX_SIZES=256,320,384
    MEM_NETS=idm,idm-plain,monai-ckpt,patchddm-ckpt; INF_NETS=idm,monai,patchddm; BF16_NETS=idm,monai-ckpt
    MAX_NETS=idm,monai-ckpt,patchddm-ckpt; REPEATS=3
    BUDGET_GIB=76; TRAIN_STEPS=200; PATCH=64; VOLUME=96; EXTRA=(); CFG_TIMEOUT=40
    T_DEPS=20; T_ENV=10; T_TESTS=45; T_MEM=130; T_INF=45; T_BF16=30; T_DATA=10; T_TRAIN=55; T_TSUM=5
    T_MAX=90; T_SUM=10
fi
# Knobs that can be overridden from the environment.
MEM_SIZES="${GPU_CHECK_SIZES:-$MEM_SIZES}"
MAX_SIZES="${GPU_CHECK_MAX_SIZES:-$MAX_SIZES}"
BUDGET_GIB="${GPU_CHECK_BUDGET_GIB:-$BUDGET_GIB}"
TRAIN_STEPS="${GPU_CHECK_STEPS:-$TRAIN_STEPS}"

FAILED=0
START=$SECONDS
# run_step NAME TIMEOUT_S COMMAND...: run under `timeout`, record {"step", "rc", "seconds", "timeout_s"} in steps.jsonl.
# With ROWS=FILE.jsonl (a bench memory result), exit 1 still counts as ok where every row is ok, skipped or
# out of memory (an OOM is a result: the plain networks are expected to run out at 256^3).
run_step() {
    local name="$1" limit="$2" t0=$SECONDS rc
    shift 2
    echo
    echo "=== [$((SECONDS - START)) s] $name (timeout ${limit} s)"
    timeout --kill-after=2 "$limit" "$@"
    rc=$?
    if [[ $rc -eq 1 && -n "${ROWS:-}" ]]; then
        "$PY" -m benchmarks.gpu_summary rows "$ROWS" && rc=0
    fi
    printf '{"step": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$STEPS"
    if [[ $rc -ne 0 ]]; then
        echo "!!! FAILED: $name (exit $rc$([[ $rc -eq 124 || $rc -eq 137 ]] && echo ", timed out"))"
        FAILED=$((FAILED + 1))
    fi
    return 0
}

# ------------------------------------------------------------------ 1. dependencies
deps() {
    local pairs=(torch:torch monai:monai nibabel:nibabel einops:einops safetensors:safetensors yaml:pyyaml
        tqdm:tqdm matplotlib:matplotlib pytest:pytest)
    [[ "$DEVICE" == cuda ]] && pairs+=(pynvml:nvidia-ml-py)  # energy and temperature, GPU only
    local missing=() pair
    # one interpreter tries every import (starting one per package costs seconds on a small machine)
    read -r -a missing < <("$PY" -c '
import importlib.util, sys
print(" ".join(p.split(":")[1] for p in sys.argv[1:] if importlib.util.find_spec(p.split(":")[0]) is None))
' "${pairs[@]}")
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "all present in $("$PY" -c 'import sys; print(sys.prefix)')"
        return 0
    fi
    if [[ " ${missing[*]} " == *" torch "* ]]; then
        echo "torch is missing: the machine's own (CUDA) torch is what this check measures"
        return 1
    fi
    # A venv over the system site-packages: pip resolves dependencies against the machine's torch.
    "$PY" -m venv --system-site-packages "$WORK/venv" || return 1
    local pip=("$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check)
    if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
        pip+=(--no-index --find-links "$ROOT/.whl")
    fi
    echo "installing ${missing[*]}"
    "${pip[@]}" "${missing[@]}" || return 1
}
echo "device=$DEVICE outdir=$OUTDIR python=$PY"
run_step dependencies "$T_DEPS" bash -c "$(declare -f deps); ROOT='$ROOT' WORK='$WORK' PY='$PY' DEVICE='$DEVICE' deps"
[[ -x "$WORK/venv/bin/python" ]] && PY="$WORK/venv/bin/python"

# ------------------------------------------------------------------ 2. environment
run_step environment "$T_ENV" "$PY" -m benchmarks.gpu_summary env "$OUTDIR/env.json" --device "$DEVICE"

# ------------------------------------------------------------------ 3. exactness tests on the device
run_step exactness "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m "$MARK" -rfEs \
    --junitxml "$OUTDIR/exactness.xml" tests/test_exactness_devices.py tests/test_device_gates.py

# ------------------------------------------------------------------ 4-6. memory, inference, bf16
bench() {  # bench NAME TIMEOUT JSON ARGS...: idm3d bench ... on $DEVICE, its rows in OUTDIR/JSON
    local name="$1" limit="$2" json="$OUTDIR/$3"
    shift 3
    ROWS="$json" run_step "$name" "$limit" "$PY" -m idm3d.cli.main bench "$@" --device "$DEVICE" \
        --timeout "$CFG_TIMEOUT" --json-out "$json" ${EXTRA[@]+"${EXTRA[@]}"}
}
bench memory "$T_MEM" memory.jsonl memory --sizes "$MEM_SIZES" --nets "$MEM_NETS" \
    --repeats "$REPEATS" --no-flops --plot "$OUTDIR/memory.png"
bench inference "$T_INF" inference.jsonl memory --inference --sizes "$INF_SIZES" --nets "$INF_NETS" \
    --repeats "$REPEATS" --no-flops
bench bf16 "$T_BF16" memory_bf16.jsonl memory --precision bf16 --sizes "$BF16_SIZES" --nets "$BF16_NETS" \
    --repeats "$REPEATS" --no-flops

# ------------------------------------------------------------------ 7. bf16 training run
run_step synthetic-data "$T_DATA" "$PY" -m benchmarks.gpu_summary volumes "$WORK/data" --size "$VOLUME"
run_step train "$T_TRAIN" "$PY" -m idm3d.cli.main train --out "$WORK/train" \
    --set data.root="$WORK/data" --set "data.targets=[t1]" --set "data.patch_size=[$PATCH,$PATCH,$PATCH]" \
    --set data.test_fraction=0.2 --set data.val_fraction=0.0 --set train.max_steps="$TRAIN_STEPS" \
    --precision bf16 --set train.device="$DEVICE" --set train.progress=false \
    --set train.log_every=10 --set train.checkpoint_every=100000
[[ -f "$WORK/train/metrics.jsonl" ]] && cp "$WORK/train/metrics.jsonl" "$OUTDIR/train_metrics.jsonl"
run_step train-summary "$T_TSUM" "$PY" -m benchmarks.gpu_summary train "$OUTDIR/train_metrics.jsonl" \
    "$OUTDIR/train_summary.json" --steps "$TRAIN_STEPS"

# ------------------------------------------------------------------ 8. largest trainable cube
run_step max-size "$T_MAX" "$PY" -m idm3d.cli.main bench max-size --budget-gib "$BUDGET_GIB" --sizes "$MAX_SIZES" \
    --nets "$MAX_NETS" --device "$DEVICE" --timeout "$CFG_TIMEOUT" \
    --json-out "$OUTDIR/max_size.jsonl" ${EXTRA[@]+"${EXTRA[@]}"}

# ------------------------------------------------------------------ 9. summary
run_step summary "$T_SUM" "$PY" -m benchmarks.gpu_summary report "$OUTDIR" --dry "${GPU_CHECK_DRY:-0}"

echo
echo "=== done in $((SECONDS - START)) s, $FAILED failed step(s); results in $OUTDIR"
ls -la "$OUTDIR"
rm -rf "$WORK"
exec 1>&- 2>&-
wait  # let tee finish writing the log before the caller collects OUTDIR
exit "$FAILED"
