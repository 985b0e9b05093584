"""Throughput of the on-device batch augmentation vs a per-sample torchvision pipeline (CPU).

Both sides produce the same thing for CIFAR-sized images — random crop 32 after zero padding 4,
random horizontal flip, conversion to float and normalization — over the same number of images:

* ``BatchTransform.train`` on uint8 batches (batch × 3 × 32 × 32), one call per batch;
* torchvision per sample: PIL image → RandomCrop(32, padding=4) → RandomHorizontalFlip →
  ToTensor → Normalize, then ``torch.stack`` per batch (what a DataLoader worker does). The PIL
  images are built before timing, so PIL decoding/conversion is not charged to torchvision.

Both run with one torch thread by default (``--threads``): per-core throughput, which is what a
DataLoader worker gets, and robust on a shared machine where multi-threaded ops stall when
another process holds a core.

Usage: ``PYTHONPATH=src python bench/bench_augment.py [--write docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image
from torchvision import transforms as T

from common import command_line, environment, median, time_interleaved, update_section
from selfkd.data import BatchTransform

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=16, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median is shown)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: per-core throughput, as in a DataLoader worker; "
        "0 keeps torch's default)",
    )
    parser.add_argument("--write", metavar="MARKDOWN", help="update section 'augment' of this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    shape = (args.batches, args.batch_size, 3, 32, 32)
    data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    n_images = args.batches * args.batch_size

    batch_tf = BatchTransform(MEAN, STD, crop_padding=4, hflip=True)

    def run_batch() -> None:
        for x in data:
            batch_tf.train(x)

    pil = [[Image.fromarray(img.permute(1, 2, 0).numpy()) for img in batch] for batch in data]
    sample_tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )

    def run_torchvision() -> None:
        for batch in pil:
            torch.stack([sample_tf(im) for im in batch])

    env_before = environment()
    times = time_interleaved(
        {"batch": run_batch, "torchvision": run_torchvision}, repeats=args.repeats
    )
    rate_batch = n_images / median(times["batch"])
    rate_tv = n_images / median(times["torchvision"])
    spread = (
        {k: n_images / max(v) for k, v in times.items()},
        {k: n_images / min(v) for k, v in times.items()},
    )
    env = environment()
    table = "\n".join(
        [
            "### Batch augmentation throughput (CPU)",
            "",
            f"Random crop 32 (zero padding 4) + horizontal flip + normalize, uint8 "
            f"{args.batch_size}×3×32×32 batches, {n_images} images per repeat, median of "
            f"{args.repeats} repeats.",
            "",
            "| pipeline | images/s (median) | range over repeats |",
            "|---|---:|---:|",
            f"| `BatchTransform.train` (whole batch) | {rate_batch:,.0f} | "
            f"{spread[0]['batch']:,.0f}–{spread[1]['batch']:,.0f} |",
            f"| torchvision per sample (PIL → RandomCrop → Flip → ToTensor → Normalize) "
            f"| {rate_tv:,.0f} | {spread[0]['torchvision']:,.0f}–{spread[1]['torchvision']:,.0f} |",
            f"| ratio of medians (batch / per sample) | {rate_batch / rate_tv:.1f}× | |",
            "",
            f"torch {env['torch']}, Python {env['python']}, {env['cpu_count']} CPUs "
            f"(torch threads: {env['torch_threads']}), {env['machine']}, load average "
            f"{env_before['load_average']} before / {env['load_average']} after (other "
            "processes on the machine make the numbers noisy; the two pipelines are timed "
            f"alternately so both see the same load). Command: `{command_line()}`",
        ]
    )
    print(table)
    if args.write:
        update_section(args.write, "augment", table)
        print(f"\nupdated section 'augment' of {args.write}")


if __name__ == "__main__":
    main()
