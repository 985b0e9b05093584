#!/usr/bin/env bash
# Set up (see scripts/setup.sh), then run the main job (configs/fashion_mnist/demo.yaml): on the
# CPU, in the overfitting study regime, phase 1 (the plain-CE superior model, also the CE row),
# AI-KD as published and AI-KD whose critic scores the student with batch statistics (the
# variant chosen on the validation split), then a results table. Two sweep
# processes share the work (both cores); rerunning skips finished runs and resumes interrupted
# ones. Extra arguments are passed to both, e.g. --set run.seed=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SELFKD_VENV:-.venv}"
SELFKD="$VENV/bin/selfkd"
start=$(date +%s)
"$SELFKD" sweep configs/fashion_mnist/demo.yaml "$@" &
second=$!
sleep 2  # let the first process take the first run (and phase 1)
"$SELFKD" sweep configs/fashion_mnist/demo.yaml "$@"
wait "$second"
"$SELFKD" report runs/demo --no-cost
echo "demo: $(( $(date +%s) - start )) s of training and evaluation; test split, last epoch, one seed:"
echo "demo: differences of a few tenths of a point are noise here (docs/results.md has 3-5 seeds)"
