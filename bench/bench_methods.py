"""Step time of every registered self-KD method relative to plain CE, and its extra memory.

One :class:`~selfkd.engine.Trainer` per method (row), all with the same model, synthetic data,
batch size, optimizer and device, built in one process. What is timed is the real engine step,
``Trainer.train_step`` (to device, on-device augmentation, ``method.training_step``, backward,
optimizer step, ``method.after_optimizer_step``) on batches taken beforehand from each trainer's
own loader (a method's batch sampler, e.g. CS-KD's class pairs, is honoured; data loading is not
charged). Every method first runs one step of epoch 0 and its ``on_epoch_end`` (so banks hold
rows and AI-KD's snapshot exists), then ``--warmup`` steps of epoch 1, then ``--rounds``
interleaved rounds: each round times ``--k`` steps of every method in turn (the order rotates
from round to round), so load changes on a shared machine hit every method alike. The ratio to
CE is the ratio of median per-step times; the spread is the range of the per-round ratios.

Rows: every method in ``selfkd.methods.METHODS`` with its default parameters (all submodules of
``selfkd.methods`` are imported first, so methods not yet imported by the package are found too),
AI-KD twice (``prev_source: bank`` and ``prev_source: snapshot``), ``stack`` as PS-KD + DRG.
Methods that need a phase-1 model (AI-KD's superior, TF-KD-self's teacher) get a checkpoint of
the untrained CE trainer (same architecture; speed does not depend on its weights). A method
that fails to build or to step is skipped with a printed note.

Memory: ``extra state`` is the size of the method's ``state_dict()`` tensors (prediction banks,
critic and its optimizer state, AI-KD's snapshot weights); ``frozen models`` are models a method
holds outside its state dict (AI-KD's superior, a teacher); on CUDA, ``extra peak`` is the
allocator peak of one step of the method minus that of CE (transient memory: extra forwards,
larger graphs).

Usage: ``PYTHONPATH=src python bench/bench_methods.py [--model preact_resnet18] [--methods ce
aikd] [--device cpu] [--write docs/benchmarks.md]``.

Stacks and variants: ``--spec LABEL=JSON`` (repeatable) adds a row with that method section, e.g.
``--spec 'pskd+drg={"name": "stack", "parts": {"pskd": {}, "drg": {}}}'`` or ``--spec
'drg 1+2={"name": "drg", "taps": ["stage1", "stage2"]}'``; with ``--methods`` given too, only
those and the specs are timed (CE always). ``--section NAME`` writes the table into another
section of the ``--write`` file (default ``methods``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bench_train import (
    SETTINGS,
    Stepper,
    bench_config,
    format_command,
    interleaved_rounds,
    load_average,
    sync,
)
from common import environment, median, update_section
from selfkd.engine import Trainer
from selfkd.engine.checkpoint import save_checkpoint
from selfkd.engine.device import resolve_device
from selfkd.engine.hostsync import count_host_reads
from selfkd.engine.rundir import close_logger

#: step-time targets from the issues: normalized method name -> max ratio to CE
TARGETS: dict[str, float] = {"aikd": 1.4, "pskd": 1.05, "drg": 1.2, "dsr": 1.2, "zfls": 1.2}


def discover_methods() -> list[str]:
    """Import every module of ``selfkd.methods`` (registering their methods); return failures."""
    import selfkd.methods as package

    failures = []
    for info in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{info.name}"
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    return failures


def normalized(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``LABEL=JSON`` of ``--spec`` as (label, method section); ValueError when malformed."""
    import json

    label, sep, body = text.partition("=")
    if not sep or not label.strip():
        raise ValueError(f"--spec must be LABEL=JSON, got {text!r}")
    spec = json.loads(body)
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"--spec {label}: the JSON must be a method section with a name")
    return label.strip(), spec


def variants(
    names: Sequence[str] | None = None, specs: Sequence[tuple[str, dict[str, Any]]] = ()
) -> list[tuple[str, dict[str, Any]]]:
    """(label, method spec) rows: CE first, then the registry (or ``names``), AI-KD twice, then
    ``specs``; with ``specs`` and no ``names`` only CE and the specs."""
    from selfkd.methods import METHODS

    if specs and not names:
        return [("ce", {"name": "ce"}), *specs]
    chosen = list(METHODS.names()) if not names else [METHODS.canonical(n) for n in names]
    chosen = ["ce"] + [n for n in dict.fromkeys(chosen) if n != "ce"]
    rows: list[tuple[str, dict[str, Any]]] = []
    for name in chosen:
        if name == "aikd":
            rows.append(("aikd (bank)", {"name": "aikd", "prev_source": "bank"}))
            rows.append(("aikd (snapshot)", {"name": "aikd", "prev_source": "snapshot"}))
        elif name == "stack":  # needs parts: the DRG/DSR paper's table III combination
            rows.append(("stack (pskd + drg)", {"name": "stack", "parts": {"pskd": {}, "drg": {}}}))
        else:
            rows.append((name, {"name": name}))
    return rows + list(specs)


def target_for(spec: dict[str, Any]) -> float | None:
    """The issue's step-time target for this row (AI-KD: only the bank variant has one; the
    targets are for default parameters, so a ``--spec`` row with other keys has none)."""
    name = normalized(spec["name"])
    if set(spec) - {"name", "prev_source"}:
        return None
    if name == "aikd" and spec.get("prev_source", "bank") != "bank":
        return None
    return TARGETS.get(name)


def tensor_bytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors in a (nested) state: tensors, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if isinstance(value, Tensor):
        key = value.untyped_storage().data_ptr() if value.numel() else id(value)
        if key in seen:
            return 0
        seen.add(key)
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    return 0


def frozen_model_bytes(method: nn.Module, student: nn.Module) -> int:
    """Bytes of models the method holds outside its submodules (other than the student)."""
    found: list[nn.Module] = []

    def visit(value: Any, depth: int = 0) -> None:
        if depth > 2:
            return
        if isinstance(value, nn.Module):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)

    for key, value in vars(method).items():
        if key.startswith("_") and key in ("_modules", "_parameters", "_buffers"):
            continue
        visit(value)
    seen = {p.untyped_storage().data_ptr() for p in student.parameters()}
    seen |= {b.untyped_storage().data_ptr() for b in student.buffers()}
    seen |= {
        t.untyped_storage().data_ptr() for t in method.state_dict().values() if torch.is_tensor(t)
    }
    total = 0
    for module in found:
        if module is student:
            continue
        total += tensor_bytes([*module.parameters(), *module.buffers()], seen)
    return total


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(SETTINGS), default="resnet8")
    parser.add_argument(
        "--methods", nargs="+", help="method names to time (default: all registered; CE always)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--k", type=int, default=3, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per method")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        help="training images per class (bank sizes scale with it; default: 4 batches)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="override the image size")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0 keeps torch's default)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument(
        "--no-discover",
        action="store_true",
        help="do not import the submodules of selfkd.methods (only what the package registers)",
    )
    parser.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="also time this method section (a stack, a DRG tap subset, ...); repeatable",
    )
    parser.add_argument("--write", metavar="MARKDOWN", help="update a section of this file")
    parser.add_argument("--section", default="methods", help="section of --write (default methods)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.k < 1 or args.warmup < 0:
        parser.error("--rounds and --k must be >= 1, --warmup >= 0")
    threads = args.threads or None
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device)

    from selfkd.methods import METHODS, build_method

    registered_before = set(METHODS.names())
    discover_failures = [] if args.no_discover else discover_methods()
    for failure in discover_failures:
        print(f"note: could not import {failure}")
    discovered = sorted(set(METHODS.names()) - registered_before)
    try:
        specs = [parse_spec(text) for text in args.spec]
    except ValueError as exc:
        parser.error(str(exc))
    rows = variants(args.methods, specs)

    model, options, channels, size, shape_note = SETTINGS[args.model]
    size = args.image_size or size
    per_class = args.train_per_class or max(1, -(-4 * args.batch_size // args.num_classes))
    load_before = load_average()
    skipped: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="selfkd-bench-methods-") as tmp:
        steppers: dict[str, Stepper] = {}
        teacher_path = f"{tmp}/phase1.pt"
        for i, (label, spec) in enumerate(rows):
            trainer = None
            try:
                cfg = bench_config(
                    name=f"row{i}",
                    out_dir=tmp,
                    model=model,
                    model_options=options,
                    channels=channels,
                    image_size=size,
                    num_classes=args.num_classes,
                    batch_size=args.batch_size,
                    train_per_class=per_class,
                    device=args.device,
                    threads=threads,
                    method=spec,
                )
                method = build_method(cfg.method)
                param = method.teacher_param
                if (
                    param is not None
                    and method.needs_teacher()
                    and getattr(method.params, param) == "auto"
                ):
                    setattr(method.params, param, teacher_path)
                trainer = Trainer(cfg, method=method, quiet=True)
                if label == "ce":
                    # the phase-1 model of teacher-based methods: CE weights, never trained
                    save_checkpoint(teacher_path, trainer.checkpoint_payload())
                # one step of epoch 0 and its end (banks written, AI-KD snapshot taken)
                first = Stepper(trainer, epoch=0)
                first.start_epoch()
                first.run(1)
                trainer.method.on_epoch_end(trainer.forward_model, 0)
                stepper = Stepper(trainer, epoch=1)
                stepper.start_epoch()
                stepper.run(args.warmup)
            except Exception as exc:
                if label == "ce":
                    raise
                skipped[label] = short_error(exc)
                print(f"note: skipping {label}: {skipped[label]}")
                traceback.print_exc(limit=-3)
                if trainer is not None:
                    close_logger(trainer.log)
                continue
            steppers[label] = stepper
            results[label] = {"spec": spec, "images": stepper.images}

        def guarded(label: str) -> Any:
            def run(k: int) -> float:
                if label in skipped:
                    return float("nan")
                try:
                    return steppers[label].run(k)
                except Exception as exc:
                    skipped[label] = short_error(exc)
                    print(f"note: skipping {label} (failed while timed): {skipped[label]}")
                    return float("nan")

            return run

        times = interleaved_rounds(
            {label: guarded(label) for label in steppers},
            ks=dict.fromkeys(steppers, args.k),
            rounds=args.rounds,
        )
        if "ce" in skipped:
            raise RuntimeError(f"the CE baseline failed while timed: {skipped['ce']}")
        ce_times = times["ce"]
        for label, stepper in steppers.items():
            if label in skipped:
                results.pop(label, None)
                continue
            per_step = times[label]
            ratios = [t / c for t, c in zip(per_step, ce_times, strict=True)]
            method, student = stepper.trainer.method, stepper.trainer.model
            results[label].update(
                ms=1000 * median(per_step),
                ms_range=(1000 * min(per_step), 1000 * max(per_step)),
                ratio=median(per_step) / median(ce_times),
                ratio_range=(min(ratios), max(ratios)),
                state_mb=tensor_bytes(method.state_dict()) / 2**20,
                frozen_mb=frozen_model_bytes(method, student) / 2**20,
            )
        for label, stepper in steppers.items():  # host reads per step (0 = never waits)
            if label in results:
                with count_host_reads() as reads:
                    stepper.run(2)
                results[label]["host_reads"] = reads.count / 2
                results[label]["read_sites"] = sorted(reads.sites)
        if device.type == "cuda":
            for label, stepper in steppers.items():
                if label not in results:
                    continue
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                try:
                    stepper.run(1)
                except Exception as exc:
                    print(f"note: no CUDA peak for {label}: {short_error(exc)}")
                    results[label]["peak_mb"] = float("nan")
                    continue
                results[label]["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            ce_peak = results["ce"]["peak_mb"]
            for r in results.values():
                r["extra_peak_mb"] = r["peak_mb"] - ce_peak
        for stepper in steppers.values():
            close_logger(stepper.trainer.log)
    load_after = load_average()
    env = environment()

    cuda = device.type == "cuda"
    header = (
        "| method | images/step | ms/step (median) | ratio to CE | spread (per-round ratios) "
        "| host reads/step | extra state (MB) | held models (MB) |"
        + (" extra peak (MB) |" if cuda else "")
        + " target | met? |"
    )
    lines = [
        f"### Method step time vs CE (`{model}`, {channels}×{size}×{size}, {device.type})",
        "",
        f"`Trainer.train_step` per method, {shape_note} synthetic data ({args.num_classes} "
        f"classes, {per_class * args.num_classes} training images), batch {args.batch_size}, SGD; "
        f"{args.rounds} interleaved rounds of k = {args.k} steps per method after {args.warmup} "
        "warm-up step(s) (epoch 1, after one step of epoch 0 so banks and snapshots exist). Ratio "
        "= median step time / median CE step time; spread = range of the per-round ratios.",
        "",
        header,
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|:---:|",
    ]
    for label, r in results.items():
        target = target_for(r["spec"])
        if target is None:
            target_text, met = "–", "–"
        else:
            target_text = f"≤ {target:g}×"
            met = "yes" if r["ratio"] <= target else "**no**"
            low, high = r["ratio_range"]
            if low <= target < high:
                met += " (spread crosses)"
        lines.append(
            f"| {label} | {r['images']} | {r['ms']:,.1f} | {r['ratio']:.2f}× "
            f"| {r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f} | {r['host_reads']:g} "
            f"| {r['state_mb']:.3f} "
            f"| {r['frozen_mb']:.2f} |"
            + (f" {r['extra_peak_mb']:+,.1f} |" if cuda else "")
            + f" {target_text} | {met} |"
        )
    notes = [
        "",
        "Targets (from the issues): AI-KD with the prediction bank ≤ 1.4× CE; PS-KD ≤ 1.05×; "
        "DRG, DSR and ZF-LS ≤ 1.2×. *host reads/step*: tensor values the step reads back "
        "to the host (`.item()`, `bool()`, boolean-mask indexing, ...; each one is a device "
        "synchronisation on a GPU), counted by `selfkd.engine.hostsync.count_host_reads` over "
        "2 steps; the engine reads its non-finite record every `run.check_every` (20) steps "
        "instead. *extra state*: tensors of `method.state_dict()` (banks "
        f"scale with the {per_class * args.num_classes} training images here); *held models*: "
        "models a method keeps outside its submodules (AI-KD's superior and snapshot, a teacher; "
        "the snapshot's weights also appear in the state dict, which copies them at checkpoint "
        "time)" + ("; *extra peak*: CUDA allocator peak of one step minus CE's." if cuda else "."),
    ]
    if discovered:
        notes.append(
            "Found by importing `selfkd.methods.*` (not yet imported by the package itself): "
            + ", ".join(f"`{n}`" for n in discovered)
            + "."
        )
    for label, reason in skipped.items():
        notes.append(f"Skipped `{label}`: {reason}.")
    for failure in discover_failures:
        notes.append(f"Not importable: {failure}.")
    notes += [
        "",
        f"torch {env['torch']}, Python {env['python']}, device `{device}`"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
        + f", {env['cpu_count']} CPUs (torch threads: {torch.get_num_threads()}), "
        f"{env['machine']}, load average (1/5/15 min) {load_before} before / {load_after} after "
        "(shared machine: methods are timed alternately so they see the same load). Command: "
        f"`{format_command('bench_methods.py', argv)}`",
    ]
    table = "\n".join(lines + notes)
    print(table)
    if args.write:
        update_section(args.write, args.section, table)
        print(f"\nupdated section '{args.section}' of {args.write}")
    return {"results": results, "skipped": skipped, "markdown": table}


if __name__ == "__main__":
    main()
