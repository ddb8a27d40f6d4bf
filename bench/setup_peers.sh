#!/usr/bin/env bash
# Create .bench-venv with the pinned peer packages (benchmark-only; cka-offline never depends on them).
# torch is pinned (bench/requirements-peers.txt), never resolved unpinned.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .bench-venv/bin/python ]; then
  "$python" -m venv .bench-venv
fi
.bench-venv/bin/python -m pip install --upgrade pip >/dev/null
.bench-venv/bin/python -m pip install -r bench/requirements-peers.txt
.bench-venv/bin/python -c "import ckatorch, torch_cka, cka, cka_pytorch, torch; print('peers ready, torch', torch.__version__)"
