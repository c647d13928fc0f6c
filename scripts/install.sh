#!/usr/bin/env bash
# Install gopc-sweep into a Python environment, idempotently.
#   scripts/install.sh [PYTHON]     (default: .venv/bin/python, created if missing)
# Used by `make` for the local virtual environment and by the cluster configs on every node.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
if [ "$py" = ".venv/bin/python" ] && [ ! -x "$py" ]; then
    python3 -m venv .venv
fi
# Without a GPU take torch's CPU build first: an unpinned torch would pull several GB of CUDA wheels.
# (Where pip's index has no CPU build, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index.)
if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "torch==2.13.0"
fi
extras="test"
command -v nvidia-smi >/dev/null 2>&1 && extras="test,gpu"
"$py" -m pip install -q -e ".[$extras]"
