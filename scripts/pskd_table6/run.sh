#!/usr/bin/env bash
# PS-KD paper table 6: {Transformer, + LS, + PS-KD} on IWSLT15 EN-DE, DE-EN and Multi30k DE-EN,
# 9 runs (GPU; needs `pip install 'selfkd[seq]' datasets` and network access to the Hub).
# Results: runs/seq/<name>-<method>/final.json (BLEU). Usage: bash scripts/pskd_table6/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
for cfg in iwslt15_en_de iwslt15_de_en multi30k_de_en; do
  for method in ce ls pskd; do
    name="table6-${cfg//_/-}-${method}"
    if [[ -f "runs/seq/${name}/final.json" ]]; then echo "done: ${name}"; continue; fi
    "$python" -m selfkd.seq.translate -c "$here/${cfg}.yaml" --set "method.name=${method}" \
      --set "name=${name}" --out "runs/seq/${name}"
  done
done
