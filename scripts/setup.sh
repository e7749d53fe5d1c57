#!/usr/bin/env bash
# Create .venv and install the project with its test, reference (oracles) and control (image preprocessing) extras.
# torch: if the venv already has a torch (e.g. a CUDA build you installed), it is kept. Otherwise the CPU
# build is installed first, so the bare `torch` requirement never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # This machine kind carries torch 2.13.0+cpu on local disk; elsewhere fall back to PyTorch's CPU index.
    .venv/bin/pip install -q "torch==2.13.0" \
        || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e ".[test,reference,control]"
