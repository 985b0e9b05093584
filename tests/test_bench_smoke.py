"""Smoke tests of the benchmark scripts: they run end to end with tiny settings and write their
markdown sections without touching the others. No timing is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    import bench_methods
    import bench_train

    yield bench_train, bench_methods
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    for name in ("bench_train", "bench_methods", "common"):
        sys.modules.pop(name, None)


OTHER = "<!-- bench:augment -->\nkept as is\n<!-- /bench:augment -->"


def test_bench_train_writes_its_section(bench_modules, tmp_path):
    bench_train, _ = bench_modules
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{OTHER}\n", encoding="utf-8")
    out = bench_train.main(
        [
            "--steps", "1", "--warmup", "1", "--round-seconds", "0", "--image-size", "8",
            "--batch-size", "4",
            "--threads", "1", "--device", "cpu", "--write", str(doc),
        ]
    )  # fmt: skip
    text = doc.read_text(encoding="utf-8")
    assert OTHER in text
    assert "<!-- bench:train -->" in text and "<!-- /bench:train -->" in text
    assert "| `resnet8` width 16 | 1×8×8 |" in text
    assert "| `preact_resnet18` | 3×8×8 |" in text
    assert "bench/bench_train.py --steps 1" in text
    assert set(out["results"]) == {"resnet8", "preact_resnet18"}
    assert all(r["ips_median"] > 0 for r in out["results"].values())


def test_bench_train_compares_speed_flags_in_its_own_section(bench_modules, tmp_path):
    bench_train, _ = bench_modules
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{OTHER}\n", encoding="utf-8")
    out = bench_train.main(
        [
            "--settings", "resnet8", "--flags", "eager", "channels_last", "bf16",
            "--steps", "1", "--warmup", "1", "--round-seconds", "0", "--image-size", "8",
            "--batch-size", "4", "--threads", "1", "--device", "cpu", "--write", str(doc),
        ]
    )  # fmt: skip
    text = doc.read_text(encoding="utf-8")
    assert "<!-- bench:train_flags -->" in text and "<!-- bench:train -->" not in text
    for flag in ("eager", "channels_last", "bf16"):
        assert f"| `resnet8` width 16 {flag} | 1×8×8 |" in text
    assert set(out["results"]) == {f"resnet8 ({f})" for f in ("eager", "channels_last", "bf16")}


def test_bench_methods_writes_its_section(bench_modules, tmp_path):
    _, bench_methods = bench_modules
    doc = tmp_path / "benchmarks.md"
    stale = "<!-- bench:methods -->\nstale table\n<!-- /bench:methods -->"
    doc.write_text(f"# Benchmarks\n\n{OTHER}\n\n{stale}\n", encoding="utf-8")
    args = [
        "--methods", "ce", "aikd", "--rounds", "1", "--k", "1", "--warmup", "1",
        "--image-size", "8", "--batch-size", "4", "--num-classes", "3", "--threads", "1",
        "--device", "cpu", "--write", str(doc),
    ]  # fmt: skip
    out = bench_methods.main(args)
    assert out["skipped"] == {}
    assert list(out["results"]) == ["ce", "aikd (bank)", "aikd (snapshot)"]
    # the bank (and the snapshot's weights) are method state; the superior is a held model
    assert out["results"]["aikd (bank)"]["state_mb"] > 0
    assert out["results"]["aikd (bank)"]["frozen_mb"] > 0
    assert out["results"]["ce"]["state_mb"] == 0
    assert all(r["host_reads"] == 0 for r in out["results"].values())  # no step waits
    text = doc.read_text(encoding="utf-8")
    assert OTHER in text
    # the section is replaced, not appended a second time
    assert "stale table" not in text
    assert text.count("<!-- bench:methods -->") == 1 and "<!-- /bench:methods -->" in text
    for row in ("| ce | 4 |", "| aikd (bank) | 4 |", "| aikd (snapshot) | 4 |"):
        assert row in text
    assert "≤ 1.4×" in text
    assert "bench/bench_methods.py --methods ce aikd" in text


def test_variants_cover_the_registry(bench_modules):
    _, bench_methods = bench_modules
    from selfkd.methods import METHODS

    rows = bench_methods.variants()
    labels = [label for label, _ in rows]
    assert labels[0] == "ce"
    assert {spec["name"] for _, spec in rows} == set(METHODS.names())
    assert "aikd (bank)" in labels and "aikd (snapshot)" in labels
    assert bench_methods.target_for({"name": "aikd", "prev_source": "snapshot"}) is None
    assert bench_methods.target_for({"name": "aikd", "prev_source": "bank"}) == 1.4


def test_bank_fidelity_on_a_saved_float32_bank(monkeypatch, tmp_path):
    from selfkd.engine.checkpoint import save_checkpoint

    monkeypatch.syspath_prepend(str(BENCH))
    import bench_bank_fidelity

    run = tmp_path / "run"
    table = torch.log_softmax(3 * torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), 1)
    save_checkpoint(run / "checkpoints" / "last.pt", {"method": {"bank.table": table}})
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{OTHER}\n", encoding="utf-8")
    argv = ["bench_bank_fidelity.py", str(run), "--topk", "2", "6", "--write", str(doc)]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        bench_bank_fidelity.main()
    finally:
        sys.modules.pop("bench_bank_fidelity", None)
        sys.modules.pop("common", None)
    text = doc.read_text(encoding="utf-8")
    assert OTHER in text and "<!-- bench:bank_fidelity -->" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if "fp16" in line}
    # top-6 of 6 classes keeps every entry: only fp16 rounding is left, as in the dense fp16 bank
    assert rows["top-6 fp16"].split(" | ")[1:] == rows["dense fp16 (default)"].split(" | ")[1:]
    assert "| 0.00 % |" in rows["top-2 fp16"]  # the largest entry is always kept
    # the measured errors are real: the top-2 bank loses mass that fp16 rounding does not
    top2 = float(rows["top-2 fp16"].split(" | ")[2])
    fp16 = float(rows["dense fp16 (default)"].split(" | ")[2])
    assert top2 > 100 * fp16 > 0


def test_gpu_check_without_cuda_says_it_needs_a_gpu_and_exits_0():
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py")],
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "gpu_check: needs a CUDA GPU and none is visible here; nothing checked\n"
