#!/usr/bin/env bash
# CE vs token LS vs token-level PS-KD on the CPU demo task, 3 seeds each (9 runs), then a table
# of BLEU mean ± std. Results: runs/seq/seq-demo-<method>-s<seed>/final.json.
# Usage: bash scripts/pskd_table6/cpu_demo.sh   (PYTHON=.venv/bin/python to pick the interpreter;
# EPOCHS=40 for the longer schedule, run names seq-demo-e40-<method>-s<seed>)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny model: on a loaded 2-core machine one thread ran >10x faster
epochs="${EPOCHS:-20}"
tag="seq-demo"; [[ "$epochs" == 20 ]] || tag="seq-demo-e${epochs}"
export TAG="$tag"
for seed in 0 1 2; do
  for method in ce ls pskd; do
    name="${tag}-${method}-s${seed}"
    if [[ -f "runs/seq/${name}/final.json" ]]; then continue; fi
    "$python" -m selfkd.seq.translate -c "$here/cpu_demo.yaml" --set "method.name=${method}" \
      --set "seed=${seed}" --set "train.epochs=${epochs}" --set "name=${name}" --out "runs/seq/${name}" 2>&1 | tail -1
  done
done
"$python" - <<'PY'
import json, os, statistics as st
from pathlib import Path
tag = os.environ["TAG"]
print("| method | BLEU (mean ± std, 3 seeds) | per seed |\n|---|---|---|")
for m in ("ce", "ls", "pskd"):
    b = [json.loads(Path(f"runs/seq/{tag}-{m}-s{s}/final.json").read_text())["bleu"] for s in (0, 1, 2)]
    print(f"| {m} | {st.mean(b):.2f} ± {st.stdev(b):.2f} | {', '.join(f'{x:.2f}' for x in b)} |")
PY
