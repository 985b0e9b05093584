#!/usr/bin/env bash
# The Fashion-MNIST CPU study of AI-KD (docs/results.md): for each seed, AI-KD and its three
# ablations (paper table 4) in the overfitting regime of configs/fashion_mnist/study/. The plain-CE
# rows are the phase-1 runs that AI-KD trains first (identical config, method ce). Seeds run as
# parallel chains (a chain trains its phase-1 model once); finished runs are skipped and
# interrupted ones resumed, so the script can be re-run after a crash.
#   usage: bash scripts/study_fmnist_aikd.sh [SEEDS] [PARALLEL] [EXTRA --set ...]
#   e.g.   bash scripts/study_fmnist_aikd.sh "0 1 2" 2
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${1:-0 1 2}"
PARALLEL="${2:-2}"
shift $(( $# > 2 ? 2 : $# )) || true
export SELFKD="${SELFKD:-.venv/bin/selfkd}"
export EXTRA="$*"
export VARIANTS="${VARIANTS:-none no_adv only_guide only_progressive}"
export OUT="${OUT:-runs/fmnist-study}"

run_chain() {
  local seed=$1 ablation name dir flag
  for ablation in $VARIANTS; do
    name="study-aikd-${ablation}${TAG:-}-s${seed}"
    dir="$OUT/$name"
    if [ -f "$dir/final.json" ]; then echo "skip $name (finished)"; continue; fi
    flag=""
    if [ -f "$dir/checkpoints/last.pt" ]; then flag="--resume"; fi
    echo "run $name $flag"
    # shellcheck disable=SC2086
    "$SELFKD" train -c configs/fashion_mnist/study/aikd.yaml -q $flag \
      --set run.seed="$seed" --set run.name="$name" --set run.out_dir="$OUT" \
      --set method.ablation="$ablation" $EXTRA || return 1
  done
}
export -f run_chain
printf '%s\n' $SEEDS | xargs -P "$PARALLEL" -I{} bash -c 'run_chain {}'
