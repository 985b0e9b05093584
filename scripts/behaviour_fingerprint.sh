#!/usr/bin/env bash
# Short fixed CPU runs of ce, pskd, aikd, dlb and drg_dsr on Fashion-MNIST, their metrics.jsonl
# stripped of the timing columns, written under OUT: run it before and after a refactor and
# diff the two folders (they must be identical on the same machine).
#   usage: bash scripts/behaviour_fingerprint.sh OUT      e.g. OUT=/tmp/fp-before
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: behaviour_fingerprint.sh OUT}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
for method in ce pskd aikd dlb drg_dsr; do
  "$PY" -m selfkd train -c configs/fashion_mnist/study/ce.yaml -q --overwrite \
    --set run.name="fp-$method" --set run.out_dir="$OUT/runs" --set method.name="$method" \
    --set data.per_class=20 --set data.val_size=500 --set train.epochs=3 \
    --set run.eval_every=1 --set run.threads=1 --set run.deterministic=true
  "$PY" - "$OUT/runs/fp-$method/metrics.jsonl" > "$OUT/$method.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(json.dumps({k: v for k, v in row.items() if k not in ("train_seconds", "sec_per_iter")},
                     sort_keys=True))
PYEOF
done
echo "fingerprint written to $OUT/{ce,pskd,aikd,dlb,drg_dsr}.jsonl"
