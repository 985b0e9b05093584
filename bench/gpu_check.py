"""GPU check: what in selfkd only a CUDA machine exercises, in under 8 minutes on one GPU.

1. the CUDA-only tests (those skipped "no CUDA device" on a CPU: every test file that has one is
   run with ``-k cuda``);
2. every method for one short epoch on the GPU with ``run.amp: fp16`` (GradScaler) +
   ``run.channels_last``, then with ``run.amp: bf16`` + ``run.compile`` (tiny synthetic data);
3. a 1-process NCCL ``torchrun`` of CE;
4. ``bench/bench_methods.py --device cuda --model preact_resnet18`` (section
   ``methods_cuda_preact_resnet18`` of docs/benchmarks.md).

Each step runs in its own subprocess under a share of the time budget; a step that runs out of
time is reported as such. The summary table goes to section ``gpu_check`` of
docs/benchmarks.md (``--write``). On a machine without CUDA it says so and exits 0.

Usage: ``PYTHONPATH=src python bench/gpu_check.py [--budget 470] [--write docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_SETS = [
    "data.name=synthetic",
    "data.batch_size=32",
    "data.eval_batch_size=128",
    "data.options.num_classes=10",
    "data.options.image_size=16",
    "data.options.channels=3",
    "data.options.train_per_class=16",
    "data.options.test_per_class=8",
    "model.name=resnet8",
    "train.epochs=1",
    "run.progress=off",
    "run.device=cuda",
]


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{path}" if path else src}


def run_step(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one subprocess; its status, seconds and the tail of its output."""
    t0 = time.perf_counter()
    if timeout < 5:
        return {"step": name, "status": "not run (time budget spent)", "seconds": 0.0, "tail": ""}
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
        )
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {timeout:.0f} s"
        out = exc.stdout or b""
        tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-1500:]
    return {"step": name, "status": status, "seconds": time.perf_counter() - t0, "tail": tail}


def cuda_test_ids() -> list[str]:
    """Test files with a CUDA-only test (skipped without a GPU)."""
    marker = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if marker.search(p.read_text(encoding="utf-8"))
    )


def method_names() -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from selfkd.methods import METHODS

    return [n for n in METHODS.names() if not n.startswith("_")]


def method_sets(method: str) -> list[str]:
    if method == "stack":
        return ["method.name=stack", "method.parts=[pskd, drg]"]
    return [f"method.name={method}"]


def methods_script(methods: list[str], flags: list[str], out_dir: str) -> list[str]:
    """One process that trains every method with ``flags`` (``--set`` values), one run each."""
    code = (
        "import json, sys\n"
        "from selfkd.cli import main\n"
        "results = {}\n"
        "for method, sets in json.loads(sys.argv[1]):\n"
        "    argv = ['train', '-c', 'configs/methods/ce.yaml', '-q', '--overwrite']\n"
        "    for s in sets: argv += ['--set', s]\n"
        "    try:\n"
        "        results[method] = main(argv)\n"
        "    except Exception as exc:  # report, go on with the next method\n"
        "        results[method] = f'{type(exc).__name__}: {exc}'.splitlines()[0]\n"
        "    print(method, results[method], flush=True)\n"
        "bad = {m: r for m, r in results.items() if r != 0}\n"
        "print('failed:', json.dumps(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    jobs = [
        [
            m,
            [*TINY_SETS, *method_sets(m), *flags, f"run.out_dir={out_dir}", f"run.name={m}"],
        ]
        for m in methods
    ]
    return [sys.executable, "-c", code, json.dumps(jobs)]


def summary(results: list[dict[str, Any]], device_name: str, argv: Sequence[str]) -> str:
    rows = [
        "### GPU check (`bench/gpu_check.py`)",
        "",
        f"Device: {device_name}. Each step ran in its own process; status and wall time.",
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
    ]
    rows += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} |" for r in results]
    import torch

    rows += [
        "",
        f"torch {torch.__version__}. Command: "
        f"`PYTHONPATH=src python bench/gpu_check.py {shlex.join(list(argv))}`".rstrip(),
    ]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all steps")
    parser.add_argument("--write", metavar="MARKDOWN", help="update section 'gpu_check' of it")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU and none is visible here; nothing checked")
        return 0
    start = time.perf_counter()

    def left(share: float) -> float:
        """Seconds for the next step: ``share`` of the budget, at most what is left."""
        remaining = args.budget - (time.perf_counter() - start)
        return max(0.0, min(remaining, share * args.budget))

    methods = method_names()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="selfkd-gpu-check-") as tmp:
        tests = cuda_test_ids()
        results.append(
            run_step(
                f"CUDA-only tests ({', '.join(tests) or 'none found'}, -k cuda)",
                [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", *tests],
                left(0.08),
            )
            if tests
            else {"step": "CUDA-only tests", "status": "none found", "seconds": 0.0, "tail": ""}
        )
        fp16 = ["run.amp=fp16", "run.channels_last=true"]
        bf16 = ["run.amp=bf16", "run.compile=true"]
        for label, flags, share in (
            ("every method, fp16 + GradScaler + channels-last", fp16, 0.22),
            ("every method, bf16 + compile", bf16, 0.35),
        ):
            results.append(
                run_step(
                    f"{label} ({len(methods)} methods, 1 epoch)",
                    methods_script(methods, flags, f"{tmp}/{label[:4]}"),
                    left(share),
                )
            )
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        torchrun += ["--nproc_per_node", "1", "-m", "selfkd", "train"]
        torchrun += ["-c", "configs/methods/ce.yaml", "-q"]
        for s in [*TINY_SETS, f"run.out_dir={tmp}/ddp", "run.name=ddp"]:
            torchrun += ["--set", s]
        results.append(run_step("torchrun, 1 process, NCCL (ce)", torchrun, left(0.1)))
        bench = [sys.executable, "bench/bench_methods.py", "--device", "cuda"]
        bench += ["--model", "preact_resnet18", "--section", "methods_cuda_preact_resnet18"]
        if args.write:
            bench += ["--write", args.write]
        results.append(
            run_step("bench_methods.py --device cuda --model preact_resnet18", bench, left(1.0))
        )
    for r in results:
        print(f"{r['status']:>28}  {r['seconds']:6.0f} s  {r['step']}")
        if r["status"] != "ok" and r["tail"]:
            print("    " + r["tail"].replace("\n", "\n    "))
    table = summary(results, torch.cuda.get_device_name(0), argv)
    print(table)
    if args.write:
        sys.path.insert(0, str(ROOT / "bench"))
        from common import update_section

        update_section(args.write, "gpu_check", table)
        print(f"updated section 'gpu_check' of {args.write}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
