"""The ``selfkd`` command line: ``train``, ``eval``, ``report`` and ``list``.

Errors a user can fix print one line (``error: ...``) and exit with status 2; an interrupted
run prints how to resume it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfkd.errors import RunDirError, RunInterrupted, SelfKDError

SUMMARY_KEYS = [
    ("top1_err", "Top-1 err (%)"),
    ("top5_err", "Top-5 err (%)"),
    ("macro_f1", "Macro-F1 (%)"),
    ("nll", "NLL"),
    ("ece", "ECE (%)"),
    ("ece_ts", "ECE+TS (%)"),
    ("aurc", "AURC (x1000)"),
]


def results_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A Markdown table of final metrics, one row per (label, final.json dict)."""
    present = [
        (k, title)
        for k, title in SUMMARY_KEYS
        if any(r.get(f"test_{k}") is not None for _, r in rows)
    ]
    lines = ["| run | " + " | ".join(t for _, t in present) + " |", "|---|" + "---|" * len(present)]
    for label, r in rows:
        cells = []
        for key, _ in present:
            value = r.get(f"test_{key}")
            cells.append(
                "-" if value is None else f"{value:.4f}" if key == "nll" else f"{value:.2f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from selfkd.config import load_config
    from selfkd.engine.rundir import RunDir
    from selfkd.engine.runner import phase1_run_dir, train

    cfg = load_config(args.config, args.set)
    run_path = Path(cfg.run.out_dir) / cfg.run.name
    try:
        final = train(cfg, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except OSError as exc:  # an I/O failure no writer turned into a SelfKDError
        where = f" ({exc.filename})" if exc.filename else ""
        raise RunDirError(
            f"{exc.strerror or exc}{where} while training {run_path}; fix it and continue "
            "with --resume"
        ) from None
    except (KeyboardInterrupt, RunInterrupted) as exc:
        # shell-quoted, so that it can be pasted back (--set model.options={width: 4})
        words = ["selfkd", "train", "--config", str(args.config)]
        for item in args.set:
            words += ["--set", item]
        resume = shlex.join([*words, "--resume"])
        if isinstance(exc, RunInterrupted):
            print(f"\n{exc}\nresume with: {resume}", file=sys.stderr)
            return exc.exit_code
        from selfkd.engine.runner import phase1_pending
        from selfkd.methods import build_method

        if RunDir(run_path).has_checkpoint():
            saved = f"the last checkpoint is {run_path}/checkpoints/last.pt"
        elif RunDir(run_path).holds_run() or phase1_pending(cfg, build_method(cfg.method)):
            saved = "--resume starts (or, in phase 1, continues) what had no checkpoint yet"
        else:  # stopped before anything was written: --resume would find nothing
            print(
                f"\ninterrupted before anything was saved; start again with: {shlex.join(words)}",
                file=sys.stderr,
            )
            return 130
        print(f"\ninterrupted; {saved}\nresume with: {resume}", file=sys.stderr)
        return 130
    from selfkd.engine.distributed import is_main

    if not is_main():
        return 0  # under torchrun only rank 0 prints the table
    rows = []
    phase1 = phase1_run_dir(cfg)
    if phase1 is not None:
        p1 = RunDir(phase1).read_final()
        if p1:
            rows.append((f"phase 1: {p1.get('method', 'ce')} ({phase1})", p1))
    rows.append((f"{final['method']} ({run_path})", final))
    print("\nResults on the test split (last epoch):\n")
    print(results_table(rows))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from selfkd.engine.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, which=args.checkpoint, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            results_table(
                [
                    (
                        f"{args.run_dir} ({args.checkpoint})",
                        {f"test_{k}": v for k, v in result.items()},
                    )
                ]
            )
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import csv
    import io

    from selfkd.engine.checkpoint import atomic_write_text
    from selfkd.errors import RunDirError
    from selfkd.report.table import csv_rows, group_runs, report, scan_runs

    text = report(args.runs, cost=not args.no_cost, baseline=args.baseline, split=args.split)
    if args.csv:  # built before anything is printed or written: a bad --baseline writes nothing
        groups = group_runs(scan_runs(args.runs).runs, split=args.split)
        rows = csv_rows(groups, baseline=args.baseline)
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        try:
            atomic_write_text(Path(args.csv), buffer.getvalue())
        except OSError as exc:
            raise RunDirError(
                f"cannot write --csv {args.csv} ({exc.strerror or exc}); choose a writable path"
            ) from None
    print(text)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from selfkd.report.figures import plot_runs

    plot_runs(
        args.runs,
        args.out,
        kind=args.kind,
        classes=args.classes,
        max_points=args.max_points,
        which=args.checkpoint,
        device=args.device,
        log=print,
    )
    return 0


def cmd_data_get(args: argparse.Namespace) -> int:
    from selfkd.data import DATASETS
    from selfkd.data.download import load_with_download, source

    src = source(args.name)
    factory = DATASETS.get(src.dataset)
    # read where the reader finds it (downloading only when it is absent): the layout is ours
    raw = load_with_download(src.dataset, args.root, lambda: factory(args.root))
    print(
        f"{src.title} in {raw.root}: {len(raw.train)} train / {len(raw.test)} test images, "
        f"{raw.num_classes} classes; use it with --set data.name={src.dataset}"
        + (f" --set data.root={args.root}" if args.root else "")
    )
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from selfkd.data.download import SOURCES

    for name in SOURCES:
        src = SOURCES[name]
        files = ", ".join(r.filename for r in src.resources)
        print(f"  {name:<15} {src.title}: {files} ({src.page})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from selfkd.data import DATASETS
    from selfkd.methods import METHODS
    from selfkd.models import MODELS

    for title, registry in (("methods", METHODS), ("datasets", DATASETS), ("models", MODELS)):
        print(f"{title}:")
        for name, doc in registry.describe():
            print(f"  {name:<20} {doc}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from selfkd.sweep import load_sweep, plan_table, run_sweep

    sweep = load_sweep(args.file, args.set, args.only)  # validates every run before any trains
    print(f"plan ({args.file}):\n{plan_table(sweep.runs)}")
    if args.dry_run:
        return 0
    try:
        result = run_sweep(sweep.runs, quiet=not args.verbose)
    except (KeyboardInterrupt, RunInterrupted) as exc:
        stopped = f"\n{exc}" if isinstance(exc, RunInterrupted) else "\ninterrupted"
        print(
            f"{stopped}\nrerun the same command to resume (finished runs are skipped)",
            file=sys.stderr,
        )
        return exc.exit_code if isinstance(exc, RunInterrupted) else 130
    print(result.summary())
    return 0 if result.ok else 1


def cmd_configs_list(args: argparse.Namespace) -> int:
    from selfkd.shipped import configs_root, describe_config, list_configs

    print(f"shipped configs ({configs_root()}); use a name as `selfkd train -c NAME`:")
    for name in list_configs():
        kind, about = describe_config(name)
        print(f"  {name:<42} {kind:<6} {about}")
    return 0


def cmd_configs_copy(args: argparse.Namespace) -> int:
    from selfkd.shipped import copy_configs

    written = copy_configs(args.names, args.to, overwrite=args.overwrite)
    print(f"copied {len(written)} file(s) into {args.to}/ (with the files they are based on)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfkd.engine.export import export_run

    for path in export_run(
        args.run, args.format, which=args.checkpoint, out=args.out, overwrite=args.overwrite
    ):
        print(path)
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from selfkd.detect.train import DetectSettings, finetune

    keys = ("train_sets", "test_sets", "epochs", "lr", "min_size", "max_size", "max_iters")
    extra = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    settings = DetectSettings(
        voc_root=args.voc, device=args.device, checkpoint=args.checkpoint, **extra
    )
    finetune(args.run, settings, out=args.out, log=lambda line: print(line, file=sys.stderr))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from selfkd import __version__

    parser = argparse.ArgumentParser(prog="selfkd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"selfkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config (phase 1 first when the method needs it)")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.05 (repeatable)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run from checkpoints/last.pt"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run in the same directory")
    p.add_argument("--quiet", "-q", action="store_true", help="log to the run directory only")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on its test split")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="tables over runs: mean ± std over seeds per method")
    p.add_argument("runs", nargs="+", help="run directories or folders holding runs")
    p.add_argument("--csv", help="also write the table as CSV to this file")
    p.add_argument("--no-cost", action="store_true", help="omit the cost table")
    p.add_argument(
        "--baseline",
        metavar="METHOD",
        help="add each method's paired difference to this one (same seeds): mean, 95%% "
        "t-interval, seeds won",
    )
    p.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="the split the tables show: test (default) or val, the held-out part of the "
        "training set (data.val_size > 0): choose variants on val, never on test",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", help="figures over runs: reliability, t-SNE, overlay, curves")
    p.add_argument("runs", nargs="+", help="run directories or folders holding runs")
    p.add_argument("--out", required=True, help="folder to write the PNG files into")
    p.add_argument(
        "--kind",
        default="all",
        help="reliability, tsne, overlay, curves, critic (AI-KD diagnostics per epoch) or all "
        "(all but critic)",
    )
    p.add_argument("--classes", nargs="+", type=int, help="t-SNE classes (default: first 10)")
    p.add_argument("--max-points", type=int, default=2000, help="t-SNE points at most")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("sweep", help="expand a sweep file and train its runs (resumable)")
    p.add_argument("file", help="sweep YAML file (base, name, out_dir, grid, set, runs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument(
        "--only", metavar="PATTERN", help="only runs whose name matches (glob/substring)"
    )
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value of every run, e.g. --set train.epochs=1 (repeatable)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="show each run's training log")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("list", help="list methods, datasets and models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("configs", help="the configs shipped with selfkd: list, copy")
    configs_sub = p.add_subparsers(dest="configs_command", required=True)
    q = configs_sub.add_parser("list", help="every shipped config's name (`-c NAME` takes it)")
    q.set_defaults(func=cmd_configs_list)
    q = configs_sub.add_parser("copy", help="copy shipped configs (and their bases) to edit")
    q.add_argument("names", nargs="*", help="configs or folders, e.g. paper/aikd (default: all)")
    q.add_argument("--to", default="configs", help="destination folder (default: ./configs)")
    q.add_argument("--overwrite", action="store_true", help="replace files already there")
    q.set_defaults(func=cmd_configs_copy)

    p = sub.add_parser("export", help="write a run's weights (safetensors) and config")
    p.add_argument("run", help="run directory (or a checkpoint .pt file)")
    p.add_argument("--format", default="safetensors", choices=["safetensors"])
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--out", help="folder to write into (default: RUN/export)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="datasets: `selfkd data get NAME` downloads one")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("get", help="download a dataset (checksum-verified) and check it")
    q.add_argument("name", help="dataset name, e.g. cifar100 (see `selfkd data list`)")
    q.add_argument("--root", help="folder to put it in (data.root; default $SELFKD_DATA or ./data)")
    q.set_defaults(func=cmd_data_get)
    q = data_sub.add_parser("list", help="the downloadable datasets and their sources")
    q.set_defaults(func=cmd_data_list)

    p = sub.add_parser("detect", help="fine-tune Faster R-CNN on VOC with a run's backbone (mAP)")
    p.add_argument("run", help="run directory (or checkpoint .pt) of a torchvision ResNet")
    p.add_argument("--voc", required=True, help="folder holding VOCdevkit/VOC2007 (and VOC2012)")
    p.add_argument("--train-sets", help="YEAR:SET list (default 2007:trainval,2012:trainval)")
    p.add_argument("--test-sets", help="YEAR:SET list (default 2007:test)")
    p.add_argument("--epochs", type=int, help="default 10 (lr ×0.1 after epoch 5)")
    p.add_argument("--lr", type=float, help="default 1e-3")
    p.add_argument("--min-size", type=int, help="shorter image side (default 600)")
    p.add_argument("--max-size", type=int, help="longer image side at most (default 1000)")
    p.add_argument("--max-iters", type=int, help="steps per epoch at most (smoke runs)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default RUN/detect)")
    p.set_defaults(func=cmd_detect)
    return parser


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _one_line_warning(
    message: Any, category: Any, filename: str, lineno: int, line: Any = None
) -> str:
    """selfkd's own warnings print as ``warning: ...`` (one line); others as Python prints them."""
    if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SelfKDError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141


if __name__ == "__main__":
    sys.exit(main())
