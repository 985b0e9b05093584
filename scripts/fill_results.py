"""Refresh the tables of docs/results.md from the runs in runs/fmnist-study.

usage: python scripts/fill_results.py [RUNS_DIR] [DOC]
Each table sits between <!-- table:NAME --> and <!-- /table:NAME --> markers; the numbers are
computed by selfkd.report from the runs' own final.json files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from selfkd.report.table import cost_table, find_runs, group_runs, markdown_table

ABLATIONS = [
    "ce",
    "aikd",
    "aikd (ablation=no_adv)",
    "aikd (ablation=only_guide)",
    "aikd (ablation=only_progressive)",
]
CRITIC = [
    "ce",
    "aikd",
    "aikd (critic_norm=layernorm)",
    "aikd (critic_norm=none)",
    "aikd (critic_lr=0.001, critic_norm=layernorm)",
    "aikd (ablation=no_adv)",
]

#: the compact-bank comparison (configs/paper/cpu/fmnist_bank_precision.yaml)
BANKS = [
    "pskd (bank_dtype=float32)",
    "pskd",
    "pskd (bank_topk=3)",
    "aikd (bank_dtype=float32)",
    "aikd",
    "aikd (bank_topk=3)",
]


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fmnist-study")
    doc = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/results.md")
    settings = group_runs(find_runs([runs]))
    if len(settings) != 1:
        raise SystemExit(f"expected one setting in {runs}, found {len(settings)}")
    ((setting, groups),) = settings.items()
    by_label = {g.label: g for g in groups}

    def pick(labels):
        return [by_label[label] for label in labels if label in by_label]

    variants = ("ablation=", "critic_", "bank_")
    methods = [g for g in groups if not any(v in g.label for v in variants)]
    tables = {
        "ablations": markdown_table(pick(ABLATIONS)),
        "critic": markdown_table(pick(CRITIC)),
        "banks": markdown_table(pick(BANKS)),
        "methods": markdown_table(methods)
        + "\n\nCost (mean over seeds):\n\n"
        + cost_table(methods),
    }
    text = doc.read_text()
    for name, table in tables.items():
        block = f"<!-- table:{name} -->\n*Setting: {setting}.*\n\n{table}\n<!-- /table:{name} -->"
        pattern = rf"<!-- table:{name} -->.*?<!-- /table:{name} -->"
        text, n = re.subn(pattern, block.replace("\\", "\\\\"), text, flags=re.S)
        if n != 1:
            raise SystemExit(f"{doc} has no <!-- table:{name} --> section")
    doc.write_text(text)
    print(f"updated {', '.join(tables)} in {doc}")


if __name__ == "__main__":
    main()
