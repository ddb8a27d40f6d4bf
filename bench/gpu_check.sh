#!/usr/bin/env bash
# Issue 19: the CUDA path checked and timed in one call of the device machine (an H200), in under 8 minutes.
#
#   bash bench/gpu_check.sh              on the device machine: install, CUDA tests, CUDA extraction, bench_gpu.py
#   bash bench/gpu_check.sh --dry-run    here, without CUDA: every CPU-side part, the CUDA steps marked skipped
#
# Options: --budget SECONDS (whole script, default 450), --python PY (default: python3 there, .venv here).
# Writes to $OUT (the device tool's output folder; default bench/results/gpu_check): summary.json (each
# step's status, exit code, seconds and limit, plus the benchmark targets), gpu.json (bench_gpu.py on W),
# gpu-H.json (workload H, when bench/benchlib.py defines it) and log.txt. Each step runs under `timeout`, its
# limit cut to what is left of the budget, so one hang cannot eat the lease. Exits 1 if any step failed,
# after writing the summary. Nothing is downloaded: the device machine's python3 already has torch (CUDA),
# numpy, h5py, click, pluggy, pytest, safetensors; this project and its plugins are installed from the
# working tree (editable, no build isolation), and any wheels in .whl/ (carried with the call) first.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
BUDGET=450
PY=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --python) PY=${2:?--python needs a path}; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --dry-run, --budget SECONDS, --python PY)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi

OUT=${OUT:-$REPO/bench/results/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/cka-gpu-check}
mkdir -p "$OUT" "$WORK"
STEPS=$WORK/steps.tsv
LOG=$OUT/log.txt
: >"$STEPS"
: >"$LOG"
export PYTHONUNBUFFERED=1
START=$SECONDS
LAYERS="conv1,bn1,relu1,conv2,bn2,relu2,pool2,conv3,relu3,fc1,relu4,fc2"

record() {  # name status rc seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"
}

skip() {  # name reason
  echo "== $1: skipped ($2)" | tee -a "$LOG"
  record "$1" skip 0 0 0 "$2"
}

step() {  # name limit_s command...
  local name=$1 limit=$2 left rc t0 dt status note=""
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then  # not run counts as failed: the check is incomplete
    echo "== $name: not run (budget of ${BUDGET}s spent)" | tee -a "$LOG"
    record "$name" fail 1 0 0 "not run: budget of ${BUDGET}s spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local shown=${*//$'\n'/ }
  echo "== $name (limit ${limit}s): ${shown:0:150}" | tee -a "$LOG"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  if [ "$rc" = 0 ]; then status=pass; else status=fail; fi
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after ${limit}s"
  echo "== $name: $status (rc $rc, ${dt}s) $note" | tee -a "$LOG"
  record "$name" "$status" "$rc" "$dt" "$limit" "$note"
}

finish() {
  "$PY" bench/gpu_check_steps.py summary "$STEPS" "$OUT/summary.json" "$OUT/gpu.json" "$OUT/gpu-H.json" 2>&1 \
    | tee -a "$LOG"
  if cut -f2 "$STEPS" | grep -qx fail; then exit 1; fi
}
trap finish EXIT

# 1. what the machine has; on the device machine CUDA must be there, or every later number is meaningless
env_check='
import sys, torch, numpy, h5py, click, pluggy
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "numpy", numpy.__version__, "h5py", h5py.__version__)
ok = torch.cuda.is_available()
print("cuda", ok, torch.cuda.get_device_name(0) if ok else "")
sys.exit(0 if ok or sys.argv[1] == "1" else 1)
'
step env 60 "$PY" -c "$env_check" "$DRY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
  >>"$LOG" 2>&1

# 2. install: carried wheels (if any), then the project and its plugins from this working tree
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
export PATH=$BIN:$PATH
if [ $DRY = 1 ]; then
  skip install "dry run: using $PY as it is"
else
  wheels=(.whl/*.whl)
  if [ -e "${wheels[0]}" ]; then
    step install-wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile "${wheels[@]}"
  fi
  step install 90 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
    -e . -e plugins/torch -e plugins/onnx -e plugins/arrays
fi
step commands 30 bash -c 'command -v cka-extract && command -v cka-analyze && cka-analyze --help >/dev/null'

# 3. the CUDA tests (only the files that have any: the others may import what the machine lacks)
mapfile -t cuda_tests < <(grep -l 'pytest.mark.cuda' tests/*.py)
if [ $DRY = 1 ]; then
  step cuda-tests-collect 60 "$PY" -m pytest -q -p no:cacheprovider --collect-only -m cuda "${cuda_tests[@]}"
  skip cuda-tests "dry run: no CUDA"
else
  step cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda "${cuda_tests[@]}"
fi

# 4. a small model extracted on CUDA (the sample data's PyTorch CNN, as in sample_data/demo.sh), compared
#    layer by layer with the same extraction on the CPU
extract() {  # device output [extra...]
  local device=$1 output=$2
  shift 2
  cka-extract sample_data/digits_cnn.py:make_model --weights sample_data/cnn_a.safetensors \
    --inputs sample_data/digits.npz --layers "$LAYERS" -o "$output" --overwrite --quiet --device "$device" "$@"
}
export -f extract
export LAYERS
if [ $DRY = 1 ]; then
  skip extract-cuda "dry run: no CUDA"
  step extract-cpu 90 bash -c 'extract cpu "$0" --max-examples 256' "$WORK/cnn_a_cpu.h5"
  cp "$WORK/cnn_a_cpu.h5" "$WORK/cnn_a_cuda.h5" 2>/dev/null  # the comparison itself still runs
else
  step extract-cuda 90 bash -c 'extract cuda "$0"' "$WORK/cnn_a_cuda.h5"
  step extract-cpu 90 bash -c 'extract cpu "$0"' "$WORK/cnn_a_cpu.h5"
fi
step extract-compare 60 "$PY" bench/gpu_check_steps.py compare "$WORK/cnn_a_cuda.h5" "$WORK/cnn_a_cpu.h5"

# 5. bench_gpu.py on W (smoke size in a dry run), then on H if bench/benchlib.py defines it
if [ $DRY = 1 ]; then
  step bench-W 180 "$PY" bench/bench_gpu.py --smoke --dry-run --results-dir "$OUT" --data-dir "$WORK/data"
else
  step bench-W 240 "$PY" bench/bench_gpu.py --runs 2 --results-dir "$OUT" --data-dir "$WORK/data"
fi
if "$PY" bench/gpu_check_steps.py has-workload H >>"$LOG" 2>&1; then
  if [ $DRY = 1 ]; then
    skip bench-H "dry run: workload H is too large for the CPU check"
  else
    step bench-H 300 "$PY" bench/bench_gpu.py --workload H --runs 1 --cpu-runs 0 --results-dir "$OUT" \
      --data-dir "$WORK/data"
  fi
else
  skip bench-H "workload H is not defined in bench/benchlib.py yet"
fi
