#!/usr/bin/env bash
# Set up leanconv in .venv/ of this checkout: torch 2.13.0 (CPU wheel) first, then the package
# with its pinned dependencies, and the Debian package with Fashion-MNIST when it is missing.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check"
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    $PIP install -q "torch==2.13.0"          # CPU wheel; must come before anything that depends on torch
fi
$PIP install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# the optional OpenVINO runtime (--runtime openvino); leanconv works without it, so a failure only warns
if ! out=$($PIP install -q -e ".[openvino]" 2>&1); then
    echo "setup: the optional OpenVINO runtime was not installed (leanconv works without it):"
    echo "$out" | grep -v "^WARNING: Location" | tail -3
fi
# the compatibility matrix's third-party model files (pure PyTorch); --no-deps: its metadata
# asks for torchvision, which none of those files imports (and which would replace torch)
$PIP install -q --no-deps "pytorchcv==0.0.74" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import leanconv, torch; print('leanconv', leanconv.__version__, 'torch', torch.__version__)"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
