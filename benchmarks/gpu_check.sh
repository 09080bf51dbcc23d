#!/usr/bin/env bash
# The GPU part of issue #15 in one go, on a CUDA machine lent for a few minutes:
#   (a) bench_losses.py on CUDA, float32/float16/bfloat16, eager; then a --compile run
#   (b) fp16_numerics.py: Inf/NaN and GradScaler skipped steps of every loss under float16 autocast
#   (c) bench_training.py: nnUNetv2_train it/s with torch.compile on (nnU-Net's CUDA default)
# Everything goes to $OUT (default benchmarks/results/): <step>.log and the --json files.
#
# BEFORE RUNNING on the device machine (it has no internet): install the checkout without
# dependencies, which must already be there (torch, nnunetv2):   pip install -e . --no-deps
#
# Usage:  bash benchmarks/gpu_check.sh            # CUDA
#         bash benchmarks/gpu_check.sh --dry-run  # (or DRY_RUN=1) every step on CPU, tiny settings
#         PYTHON=/path/to/python OUT=/some/folder bash benchmarks/gpu_check.sh
#
# Budget on an H100/H200: under 8 minutes, guaranteed by the per-step limits below (their sum, 435 s,
# plus 5 s kill grace a step and ~20 s of version checks: at most 475 s). Estimates, per step:
#   (a) eager: 12 settings x 20 rows x 10 runs of ~10 ms plus CPU-side inputs: ~45 s     -> limit  65 s
#   (a) compile: every row compiled (fwd+bwd, ~5 s each) is ~100 s a setting, so only the two settings
#       that matter most (float16 = nnU-Net's CUDA autocast, 14 classes, 3d_fullres then 2d); the JSON
#       is written after each setting, so a cut-off run keeps the first                  -> limit 135 s
#   (b) fp16_numerics: 4 settings x 18 losses x 21 forward+backward: ~30 s               -> limit  50 s
#   (c) training: bench_training.py only generates a 2D dataset (its CONFIGURATION is "2d"), so no 3D;
#       --size 256 (patch 256x256; 512 would double the epoch time for no new information), nnUNetTrainer
#       + 2 trainers, 1 round of 2 epochs x 40 iterations (the first epoch is left out): planning ~10 s,
#       first run ~85 s (network compile), the later ones ~40 s (inductor's cache)      -> limit 185 s
# A step that fails or runs out of time is reported and the next one runs; the exit status is 1 then.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: error: expected --dry-run or --help, got $arg" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ $DRY_RUN == 1 ]]; then
    # never next to the real results: a CPU dry run must not overwrite losses_cuda.json
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry_run.XXXXXX")}
else
    OUT=${OUT:-benchmarks/results}
fi
mkdir -p "$OUT"
FAILED=()

step() {  # step NAME LIMIT_SECONDS COMMAND...: console + $OUT/NAME.log; a failure is recorded, not fatal
    local name=$1 limit=$2 rc=0 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    if ((rc == 124 || rc == 137)); then
        FAILED+=("$name (timed out after ${limit} s)")
    elif ((rc != 0)); then
        FAILED+=("$name (exit $rc)")
    fi
}

preflight() {  # the machine and versions first, so that a failed run still says what it ran on
    echo "=== gpu_check.sh $(date -u +%FT%TZ), dry run: $DRY_RUN, output: $OUT"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi
    elif [[ $DRY_RUN == 1 ]]; then
        echo "(dry run: no nvidia-smi here)"
    else
        echo "gpu_check.sh: error: expected nvidia-smi on a CUDA machine, got none" >&2
        exit 2
    fi
    if ! "$PYTHON" -c "import nnunetv2, nnunet_losses" 2> "$OUT/import_error.log"; then
        cat "$OUT/import_error.log" >&2
        echo "gpu_check.sh: error: $PYTHON cannot import nnunetv2 and nnunet_losses; without internet, install" \
             "this checkout first: pip install -e . --no-deps (torch and nnunetv2 must already be installed)" >&2
        exit 2
    fi
    rm "$OUT/import_error.log"
    "$PYTHON" - "$DRY_RUN" << 'EOF'
import importlib.metadata as metadata
import platform
import sys

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), cuda available: {torch.cuda.is_available()}")
for package in ("nnunetv2", "nnunet-losses", "monai", "triton"):
    try:
        print(f"{package} {metadata.version(package)}")
    except metadata.PackageNotFoundError:
        print(f"{package}: not installed")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
elif sys.argv[1] != "1":
    sys.exit("gpu_check.sh: error: expected torch.cuda.is_available(), got False (use --dry-run on a CPU)")
EOF
}

preflight
if [[ $DRY_RUN == 1 ]]; then
    DEVICE=cpu
    LIMITS=(300 400 300 400)
    LOSSES=(--quick --shapes 2,8,8 --classes 3 --dtype float32 float16 bfloat16 --repeats 1 --warmup 0)
    COMPILE=(--quick --shapes 2,8,8 --classes 3 --dtype float32 --repeats 1 --warmup 0 --losses MimeLoss)
    NUMERICS=(--quick --shapes 2,8,8 1,4,4,4 --classes 3 --steps 2)
    TRAINING=(--trainers nnUNetTrainerMime --repeats 1 --epochs 2 --iterations 2 --size 32 --cases 5
              --da-workers 0 --planning-processes 1)
else
    DEVICE=cuda
    LIMITS=(65 135 50 185)
    LOSSES=(--shapes 2d 3d_fullres --classes 4 14 --dtype float32 float16 bfloat16)
    COMPILE=(--shapes 3d_fullres 2d --classes 14 --dtype float16 --repeats 5 --warmup 1)
    NUMERICS=()
    # nnUNet_compile is left unset: nnU-Net compiles on CUDA by default, as in a real training
    TRAINING=(--trainers nnUNetTrainerMime nnUNetTrainerMarginalDiceCE --repeats 1 --epochs 2 --iterations 40
              --size 256 --cases 5 --da-workers 8 --planning-processes 4)
fi

step losses_cuda "${LIMITS[0]}" "$PYTHON" benchmarks/bench_losses.py --device "$DEVICE" "${LOSSES[@]}" \
    --no-progress --json "$OUT/losses_cuda.json"
step losses_cuda_compile "${LIMITS[1]}" "$PYTHON" benchmarks/bench_losses.py --device "$DEVICE" "${COMPILE[@]}" \
    --compile --no-progress --json "$OUT/losses_cuda_compile.json"
step fp16_cuda "${LIMITS[2]}" "$PYTHON" benchmarks/fp16_numerics.py --device "$DEVICE" ${NUMERICS[@]+"${NUMERICS[@]}"} \
    --json "$OUT/fp16_cuda.json"
step training_cuda "${LIMITS[3]}" "$PYTHON" benchmarks/bench_training.py --device "$DEVICE" "${TRAINING[@]}" \
    --json "$OUT/training_cuda.json"

echo "=== done after $SECONDS s; files in $OUT:"
ls -l "$OUT"
if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps passed"
