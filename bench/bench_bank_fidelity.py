"""How far a compact prediction bank is from the float32 one, on a real trained bank.

Reads the float32 bank of a finished PS-KD or AI-KD run (``method.bank_dtype: float32``; its
``checkpoints/last.pt``, loaded with ``weights_only=True``), writes every row into a float16
bank, a bfloat16 bank and top-k banks (float16 values), and reports per storage, over all rows:
the largest and the mean absolute error of the probabilities that come back (the softmax of
``bank.lookup``, as PS-KD and AI-KD use them),
the mean KL(p_fp32 ‖ p_compact) in nats, and the share of rows whose most likely class changes.
A PS-KD target ``(1 − α_t)·y + α_t·p`` inherits α_t times the probability error.

Usage: ``PYTHONPATH=src python bench/bench_bank_fidelity.py RUN [--topk 1 2 3 5]
[--write docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import finish
from selfkd.banks import PredictionBank
from selfkd.engine.checkpoint import load_checkpoint


def float32_bank(run: Path) -> torch.Tensor:
    """The N×K float32 log-probability table of the run's last checkpoint."""
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    table = state["method"].get("bank.table")
    if table is None or table.dtype != torch.float32:
        raise SystemExit(
            f"{run}: no float32 dense bank in the checkpoint (train with method.bank_dtype: "
            "float32 and no bank_topk)"
        )
    return table


def compare(reference: torch.Tensor, bank: PredictionBank) -> dict[str, float]:
    rows = torch.arange(reference.shape[0])
    bank.update(rows, reference)  # log-probabilities are their own normalized logits
    p_ref = reference.exp()
    log_q = torch.log_softmax(bank.lookup(rows), dim=1)  # PS-KD and AI-KD renormalize rows
    p = log_q.exp()
    error = (p - p_ref).abs()
    log_ratio = torch.where(p_ref > 0, reference - log_q, torch.zeros_like(p))
    kl = (p_ref * log_ratio).sum(1)
    return {
        "max_abs": float(error.max()),
        "mean_abs": float(error.mean()),
        "kl": float(kl.mean()),
        "argmax_changed": float((p.argmax(1) != p_ref.argmax(1)).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run with a float32 bank")
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--write", help="update section 'bank_fidelity' of this markdown file")
    args = parser.parse_args()
    reference = float32_bank(args.run)
    n, k_classes = reference.shape
    labels = torch.zeros(n, dtype=torch.long)
    storages: list[tuple[str, PredictionBank]] = [
        ("dense fp16 (default)", PredictionBank(n, k_classes, labels, torch.float16)),
        ("dense bf16", PredictionBank(n, k_classes, labels, torch.bfloat16)),
    ]
    for k in args.topk:
        if k <= k_classes:
            bank = PredictionBank(n, k_classes, labels, torch.float16, "topk", k)
            storages.append((f"top-{k} fp16", bank))
    results = {name: compare(reference, bank) for name, bank in storages}
    lines = [
        f"The float32 bank of `{args.run}` ({n:,} rows × {k_classes} classes, after its last "
        "epoch) stored in each compact form and read back:",
        "",
        "| storage | max abs prob error | mean abs prob error | mean KL (nats) | argmax changed |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {name} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['kl']:.2e} "
            f"| {100 * r['argmax_changed']:.2f} % |"
            for name, r in results.items()
        ],
    ]
    finish(lines, "bank_fidelity", args.write)


if __name__ == "__main__":
    main()
