#!/usr/bin/env bash
# Run every benchmark and regenerate docs/benchmarks.md. Extra arguments (e.g. --quick) go to every script.
# The full run writes about 20 GB of activation files under bench/results/data (git-ignored; workload H's
# 6.4 GB of them) and takes roughly 35 minutes on 2 cores (32 on 2026-12-01: bench_extract about 7,
# bench_onnx about 4, bench_coverage about 3, bench_hundreds about 8); --quick takes several minutes
# (bench_extract's disk measurement writes two files of about 1 GB). The peers need .bench-venv (bash bench/setup_peers.sh); without it their rows are skipped, and
# bench_gpu.py skips without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
for script in bench_speed bench_floor bench_accuracy bench_memory bench_extract bench_onnx bench_gpu bench_full bench_coverage bench_hundreds; do
  echo "== $script $*"
  "$py" "bench/$script.py" "$@"
done
"$py" bench/report.py
