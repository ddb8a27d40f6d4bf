#!/usr/bin/env bash
# The demo `make demo` runs: extract network A (PyTorch) and network B (ONNX) over the bundled digits,
# then compare A with B and A with itself. Outputs go to demo_output/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_OUTPUT:-demo_output}   # tests run the demo into a temporary folder on fewer examples
limit=${DEMO_MAX_EXAMPLES:+--max-examples $DEMO_MAX_EXAMPLES}
mkdir -p "$out"
layers="conv1,bn1,relu1,conv2,bn2,relu2,pool2,conv3,relu3,fc1,relu4,fc2"

echo "== 1/4  cka-extract: network A (PyTorch factory + safetensors weights)"
cka-extract sample_data/digits_cnn.py:make_model --weights sample_data/cnn_a.safetensors \
  --inputs sample_data/digits.npz --layers "$layers" -o "$out/cnn_a.h5" --overwrite --quiet $limit

echo "== 2/4  cka-extract: network B (ONNX export, layers chosen by their PyTorch module names)"
cka-extract sample_data/cnn_b.onnx --inputs sample_data/digits.npz --layers "$layers" \
  -o "$out/cnn_b.h5" --overwrite --quiet $limit

cka-inspect "$out/cnn_b.h5"

echo
echo "== 3/4  cka-analyze: A against B"
cka-analyze "$out/cnn_a.h5" "$out/cnn_b.h5" -o "$out/a_vs_b.json" --plot "$out/a_vs_b.png" --overwrite

echo
echo "== 4/4  cka-analyze: A against itself"
cka-analyze "$out/cnn_a.h5" -o "$out/a_vs_a.json" --plot "$out/a_vs_a.png" --overwrite

echo
echo "Results and heatmaps are in $out/: a_vs_b.json, a_vs_b.png, a_vs_a.json, a_vs_a.png"
