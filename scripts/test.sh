#!/usr/bin/env bash
# Set up (see scripts/setup.sh), then lint and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SELFKD_VENV:-.venv}"
"$VENV/bin/ruff" check src tests bench scripts
"$VENV/bin/python" -m pytest "$@"
