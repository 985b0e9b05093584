#!/usr/bin/env bash
# Set up everything selfkd needs on a fresh machine, idempotently:
#   - a virtual environment ($SELFKD_VENV, default .venv) with torch 2.14.1 / torchvision 0.29.1,
#   - selfkd itself (editable) with its dev extras (pytest, ruff, hypothesis, matplotlib, ...),
#   - the Fashion-MNIST raw files from Debian's dataset-fashion-mnist package when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SELFKD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "setup: installing torch 2.14.1 and torchvision 0.29.1 (several GB, a few minutes)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev]"

FMNIST=/usr/share/datasets/fashion-mnist
if [ -z "${SELFKD_FASHION_MNIST:-}" ] && [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Debian package dataset-fashion-mnist"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  if command -v apt-get >/dev/null 2>&1; then
    ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: warning: could not install dataset-fashion-mnist; set SELFKD_FASHION_MNIST to a folder with the raw IDX files"
  else
    echo "setup: warning: no apt-get; set SELFKD_FASHION_MNIST to a folder with Fashion-MNIST's raw IDX files"
  fi
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch, selfkd; print("selfkd", selfkd.__version__, "torch", torch.__version__)'))"
