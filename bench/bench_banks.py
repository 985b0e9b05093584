"""Prediction-bank memory (ImageNet shape) and the cost of one vectorized bank update.

Memory is computed from shapes (:func:`selfkd.banks.bank_nbytes`; nothing of 5 GB is allocated):
an ImageNet-shaped bank of 1,281,167 rows × 1000 classes in dense fp32, dense fp16, dense bf16
and top-k (k = 5, 10, 50; fp16 values, int16 class ids, one fp32 rest term per row).

Time: one ``PredictionBank.update`` of a batch of 256 rows on a smaller bank (``--rows`` ×
``--classes``, default 50,000 × 100, CIFAR-100 shaped) with the vectorized update (one
``index_copy_``) against a per-row Python loop writing the same rows, and the top-k update;
interleaved repeats (:func:`common.time_interleaved`), medians reported.

Usage: ``PYTHONPATH=src python bench/bench_banks.py [--device cpu] [--write docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import finish, median, time_interleaved
from selfkd.banks import PredictionBank, bank_nbytes

IMAGENET = (1_281_167, 1000)


def loop_update(bank: PredictionBank, indices: torch.Tensor, logits: torch.Tensor) -> None:
    """The naive alternative: one Python-level row write per sample."""
    log_p = F.log_softmax(logits.float(), dim=1).to(bank.table.dtype)
    for row, i in enumerate(indices.tolist()):
        bank.table[i] = log_p[row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--write", help="update section 'banks' of this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)

    n, k_classes = IMAGENET
    memory = [
        ("dense fp32", bank_nbytes(n, k_classes, torch.float32)),
        ("dense fp16 (default)", bank_nbytes(n, k_classes, torch.float16)),
        ("dense bf16", bank_nbytes(n, k_classes, torch.bfloat16)),
    ]
    for k in (5, 10, 50):
        memory.append((f"top-{k} fp16", bank_nbytes(n, k_classes, torch.float16, "topk", k)))

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(args.classes, (args.rows,), generator=g)
    dense = PredictionBank(args.rows, args.classes, labels, torch.float16).to(device)
    looped = PredictionBank(args.rows, args.classes, labels, torch.float16).to(device)
    topk = PredictionBank(args.rows, args.classes, labels, "float16", "topk", 10).to(device)
    indices = torch.randperm(args.rows, generator=g)[: args.batch].to(device)
    logits = torch.randn(args.batch, args.classes, generator=g).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fns = {
        "vectorized": lambda: (dense.update(indices, logits), sync()),
        "per-row loop": lambda: (loop_update(looped, indices, logits), sync()),
        "top-10": lambda: (topk.update(indices, logits), sync()),
    }
    times = time_interleaved(fns, repeats=args.repeats, warmup=2)
    assert torch.equal(dense.table, looped.table), "the loop wrote other rows than update()"
    med = {name: median(t) for name, t in times.items()}

    lines = [
        "Prediction banks (PS-KD, AI-KD): memory of an ImageNet-shaped bank (1,281,167 × 1000, "
        "from shapes) and the time of one update of a batch of "
        f"{args.batch} rows on a {args.rows:,} × {args.classes} bank ({device}).",
        "",
        "| bank | memory |",
        "|---|---|",
        *[f"| {name} | {nbytes / 2**20:,.0f} MiB |" for name, nbytes in memory],
        "",
        "| update of one batch | median time | vs vectorized |",
        "|---|---|---|",
        *[
            f"| {name} | {1e6 * t:,.0f} µs | {t / med['vectorized']:.1f}× |"
            for name, t in med.items()
        ],
        "",
        "Top-k keeps the k largest log-probabilities and their class ids (int16) per row plus one "
        "fp32 log of the remaining mass per row; exact when k = K.",
    ]
    finish(lines, "banks", args.write)


if __name__ == "__main__":
    main()
