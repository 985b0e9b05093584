"""Training throughput (images/s) of the real engine step ``Trainer.train_step`` with method ``ce``.

Two settings, each a full :class:`~selfkd.engine.Trainer` on synthetic data (batch 128, SGD):

* ``resnet8`` (width 16) on 1×28×28 inputs, 10 classes: the small CPU net, Fashion-MNIST-shaped;
* ``preact_resnet18`` on 3×32×32 inputs, 10 classes: the CIFAR network (> 1 s per step on a CPU
  core, so the default step counts are small).

What is timed is ``Trainer.train_step`` itself: batch to the device, on-device augmentation,
``method.training_step``, backward, optimizer step, ``method.after_optimizer_step``; the batches
are taken from the trainer's own loader beforehand, so data loading is not charged. After a few
warm-up steps the settings are timed alternately (round 1: k steps of each, round 2: ..., with k
chosen from the warm-up so that one round of a setting lasts about ``--round-seconds``): on a
shared machine both settings see the same load. Reported: images/s at the median step time and
the range over rounds, and the peak memory (CUDA allocator peak of that setting's steps; on the
CPU the process's peak resident set after that setting's warm-up, which includes the settings
built before it).

Usage: ``PYTHONPATH=src python bench/bench_train.py [--steps 5] [--warmup 2] [--threads 1]
[--device cpu] [--write docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from common import environment, median, update_section
from selfkd.config import config_from_dict
from selfkd.engine import Trainer
from selfkd.engine.cpu import onednn_tier
from selfkd.engine.device import peak_memory_mb, resolve_device
from selfkd.engine.rundir import close_logger

#: name -> (model, model options, channels, image size, what it stands for)
SETTINGS: dict[str, tuple[str, dict[str, Any], int, int, str]] = {
    "resnet8": ("resnet8", {"width": 16}, 1, 28, "Fashion-MNIST-shaped"),
    "preact_resnet18": ("preact_resnet18", {}, 3, 32, "CIFAR-shaped"),
}


#: --flags: name -> run options of the engine's speed flags
FLAGS: dict[str, dict[str, Any]] = {
    "eager": {},
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "bf16": {"amp": "bf16"},
}


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def format_command(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run (``argv`` without the program name)."""
    env = "".join(
        f"{k}={shlex.quote(os.environ[k])} "
        for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
        if os.environ.get(k)
    )
    return f"{env}PYTHONPATH=src python bench/{script} {shlex.join(list(argv))}".rstrip()


def bench_config(
    *,
    name: str,
    out_dir: str | Path,
    model: str,
    model_options: dict[str, Any],
    channels: int,
    image_size: int,
    num_classes: int,
    batch_size: int,
    train_per_class: int,
    device: str,
    threads: int | None,
    method: dict[str, Any] | None = None,
    run_options: dict[str, Any] | None = None,
) -> Any:
    """A synthetic-data config for benchmarking (constant lr, full batches only); ``run_options``
    adds ``run`` keys (``compile``, ``channels_last``, ``amp``)."""
    return config_from_dict(
        {
            "run": {
                "name": name,
                "out_dir": str(out_dir),
                "seed": 0,
                "device": device,
                "progress": "off",
                "threads": threads,
                **(run_options or {}),
            },
            "data": {
                "name": "synthetic",
                "batch_size": batch_size,
                "eval_batch_size": 256,
                "drop_last": True,
                "options": {
                    "num_classes": num_classes,
                    "image_size": image_size,
                    "channels": channels,
                    "train_per_class": train_per_class,
                    "test_per_class": 1,
                },
            },
            "model": {"name": model, "options": dict(model_options)},
            "train": {"epochs": 10, "optimizer": "sgd", "lr": 0.05, "schedule": "constant"},
            "method": dict(method or {"name": "ce"}),
        }
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """Calls ``trainer.train_step`` on pre-fetched batches of one epoch, as the engine loop does."""

    def __init__(self, trainer: Trainer, epoch: int) -> None:
        self.trainer = trainer
        self.epoch = epoch
        self.batches = list(trainer.data.train_loader.iterate(epoch))
        if not self.batches:
            raise RuntimeError("the benchmark's training split has no full batch")
        self.images = int(self.batches[0][0].shape[0])
        self.i = 0

    def start_epoch(self) -> None:
        trainer = self.trainer
        trainer.model.train()
        trainer.method.train()
        trainer.method.on_epoch_start(trainer.forward_model, self.epoch)

    def step(self) -> None:
        trainer = self.trainer
        step = self.i % len(self.batches)
        x, y, idx = self.batches[step]
        trainer.train_step(x, y, idx, self.epoch, step)
        trainer.global_step += 1
        self.i += 1

    def run(self, n: int) -> float:
        """Seconds per step over ``n`` steps (device synchronised at both ends)."""
        device = self.trainer.device
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(device)
        return (time.perf_counter() - t0) / max(1, n)


def steps_per_round(seconds_per_step: float, round_seconds: float, max_k: int = 50) -> int:
    """How many steps make one round of about ``round_seconds`` (at least 1)."""
    if not math.isfinite(seconds_per_step) or seconds_per_step <= 0:
        return 1
    return max(1, min(max_k, round(round_seconds / seconds_per_step)))


def interleaved_rounds(
    runners: dict[str, Callable[[int], float]], ks: dict[str, int], rounds: int
) -> dict[str, list[float]]:
    """Per-step seconds of every runner in each round; the order rotates from round to round."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(runners[name](ks[name]))
    return times


def cuda_peak_of(stepper: Stepper, steps: int = 1) -> float:
    """Peak CUDA memory (MB) allocated while running ``steps`` steps (persistent state included)."""
    device = stepper.trainer.device
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    stepper.run(steps)
    return torch.cuda.max_memory_allocated(device) / 2**20


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        default=list(SETTINGS),
        help="which settings to time (default: all)",
    )
    parser.add_argument(
        "--flags",
        nargs="+",
        choices=list(FLAGS),
        default=["eager"],
        help="engine speed flags to compare, each setting once per flag (default: eager only; "
        "more than one writes section 'train_flags')",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median is shown)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per setting")
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=0.5,
        help="target length of one setting's share of a round (k steps, k >= 1 from warm-up)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--image-size", type=int, default=None, help="override the image size of every setting"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: per-core throughput, robust on a shared machine; "
        "0 keeps torch's default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--write", metavar="MARKDOWN", help="update section 'train' of this file")
    parser.add_argument(
        "--section",
        help="name of the section --write replaces (default: 'train', or 'train_flags' with "
        "more than one flag); e.g. one section per CPU tier under ONEDNN_MAX_CPU_ISA",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    threads = args.threads or None
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device)
    load_before = load_average()

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="selfkd-bench-train-") as tmp:
        steppers: dict[str, Stepper] = {}
        estimates: dict[str, float] = {}
        for key, flag in [(k, f) for k in args.settings for f in args.flags]:
            model, options, channels, size, _ = SETTINGS[key]
            size = args.image_size or size
            name = f"{key}-{flag}"
            if len(args.flags) > 1:
                key = f"{key} ({flag})"
            cfg = bench_config(
                name=name,
                out_dir=tmp,
                model=model,
                model_options=options,
                channels=channels,
                image_size=size,
                num_classes=args.num_classes,
                batch_size=args.batch_size,
                # two batches per epoch at least, whatever the batch size
                train_per_class=max(1, -(-2 * args.batch_size // args.num_classes)),
                device=args.device,
                threads=threads,
                run_options=FLAGS[flag],
            )
            trainer = Trainer(cfg, quiet=True)
            stepper = Stepper(trainer, epoch=0)
            stepper.start_epoch()
            estimate = float("nan")
            for _ in range(args.warmup):
                estimate = stepper.run(1)
            if not args.warmup:  # one step anyway, to size the rounds
                estimate = stepper.run(1)
            steppers[key], estimates[key] = stepper, estimate
            results[key] = {
                "label": f"`{model}`{' width 16' if model == 'resnet8' else ''}"
                + (f" {flag}" if len(args.flags) > 1 else ""),
                "model": model,
                "shape": f"{channels}×{size}×{size}",
                "batch": stepper.images,
                "parameters": sum(p.numel() for p in trainer.model.parameters()),
                "peak_mb": peak_memory_mb(device),
            }
        ks = {k: steps_per_round(estimates[k], args.round_seconds) for k in steppers}
        times = interleaved_rounds(
            {k: s.run for k, s in steppers.items()}, ks=ks, rounds=args.steps
        )
        if device.type == "cuda":
            for key, stepper in steppers.items():
                results[key]["peak_mb"] = cuda_peak_of(stepper)
        for key, per_step in times.items():
            batch = results[key]["batch"]
            results[key].update(
                k=ks[key],
                seconds=per_step,
                ms_median=1000 * median(per_step),
                ips_median=batch / median(per_step),
                ips_low=batch / max(per_step),
                ips_high=batch / min(per_step),
            )
        for stepper in steppers.values():
            close_logger(stepper.trainer.log)
    load_after = load_average()
    env = environment()

    memory_label = (
        "peak CUDA allocated (MB)" if device.type == "cuda" else "peak RSS of the process (MB)"
    )
    rows = [
        "### Training throughput (`Trainer.train_step`, method `ce`)",
        "",
        f"Synthetic data, {args.num_classes} classes, batch {args.batch_size}, SGD (momentum 0.9, "
        f"Nesterov), one real engine step (to device, on-device augmentation, forward, backward, "
        f"optimizer step). {args.warmup} warm-up steps per setting, then {args.steps} interleaved "
        "rounds of k steps per setting; images/s at the median per-step time, range over rounds.",
        "",
        f"| setting | input | parameters | ms/step (median) | images/s (median) | range over "
        f"rounds | steps × rounds | {memory_label} |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        rows.append(
            f"| {r['label']} | {r['shape']} "
            f"| {r['parameters']:,} | {r['ms_median']:,.1f} | {r['ips_median']:,.0f} "
            f"| {r['ips_low']:,.0f}–{r['ips_high']:,.0f} | {r['k']} × {args.steps} "
            f"| {r['peak_mb']:,.0f} |"
        )
    memory_note = (
        "Memory: CUDA allocator peak during one step of that setting (model, optimizer state and "
        "activations; the other setting's model is resident too)."
        if device.type == "cuda"
        else "Memory: the process's peak resident set after that setting's warm-up; it is "
        "cumulative (it includes the settings listed above it, the Python interpreter and torch)."
    )
    rows += [
        "",
        memory_note,
        "",
        f"torch {env['torch']}, Python {env['python']}, device `{device}`"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {env['cpu_count']} CPUs (torch threads: {torch.get_num_threads()}), "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN tier "
        f"{onednn_tier()}, "
        f"{env['machine']}, load average (1/5/15 min) {load_before} before / {load_after} after "
        "(the machine is shared: other processes make the numbers noisy; the settings are timed "
        f"alternately so they see the same load). Command: "
        f"`{format_command('bench_train.py', argv)}`",
    ]
    if len(args.flags) > 1:
        rows[0] = "### Engine speed flags on this device (`Trainer.train_step`, method `ce`)"
        rows.insert(
            -1,
            "Flags: `compile` = `run.compile` (torch.compile, inductor), `channels_last` = "
            "`run.channels_last`, `bf16` = `run.amp: bf16` (autocast). The warm-up steps include "
            "compilation.\n",
        )
    section = args.section or ("train" if len(args.flags) == 1 else "train_flags")
    table = "\n".join(rows)
    print(table)
    if args.write:
        update_section(args.write, section, table)
        print(f"\nupdated section '{section}' of {args.write}")
    return {"results": results, "markdown": table, "load": (load_before, load_after)}


if __name__ == "__main__":
    main()
