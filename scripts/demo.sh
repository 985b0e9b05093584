#!/usr/bin/env bash
# Set up (see scripts/setup.sh), then run the main job: AI-KD on Fashion-MNIST on the CPU,
# phase 1 (plain-CE superior model) and phase 2 (AI-KD student), ending with a results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SELFKD_VENV:-.venv}"
exec "$VENV/bin/selfkd" train --config configs/fashion_mnist/aikd.yaml "$@"
