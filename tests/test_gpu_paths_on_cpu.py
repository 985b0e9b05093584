"""The speed flags meant for GPUs, exercised on the CPU: bf16 autocast, channels-last, compile.

No GPU is needed: PyTorch runs bf16 autocast, channels-last tensors and ``torch.compile``
(inductor, C++ backend) on the CPU, so the code paths the flags switch on are tested here.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from selfkd.config import config_from_dict
from selfkd.engine import Trainer, cpu
from selfkd.engine import device as device_mod
from selfkd.engine.checkpoint import save_checkpoint
from selfkd.engine.device import amp_dtype, compile_options
from selfkd.engine.rundir import close_logger
from selfkd.engine.runner import train
from selfkd.methods import METHODS, build_method
from selfkd.models import build_model

METHOD_NAMES = [name for name in METHODS.names() if not name.startswith("_")]


def _config(tiny: dict[str, Any], name: str, method: str, **run: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(tiny)
    cfg["run"].update(name=name, **run)
    cfg["train"]["epochs"] = 2
    # a stack needs its parts: the DRG/DSR paper's PS-KD + DRG
    cfg["method"] = {"name": method, **({"parts": ["pskd", "drg"]} if method == "stack" else {})}
    return cfg


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bf16_autocast_trains_every_method(tiny_dict: dict[str, Any], method: str) -> None:
    final = train(config_from_dict(_config(tiny_dict, method, method, amp="bf16")), quiet=True)
    assert final["status"] == "finished"
    assert math.isfinite(final["test_nll"]) and math.isfinite(final["test_ece"])


def test_bf16_step_precisions(tiny_dict: dict[str, Any], tmp_path: Path) -> None:
    """Under bf16 autocast the student's logits are bf16, the loss float32, the AI-KD critic
    and its loss float32, and the bank keeps its own dtype."""
    cfg = config_from_dict(_config(tiny_dict, "aikd-bf16", "aikd", amp="bf16"))
    phase1 = config_from_dict(_config(tiny_dict, "phase1", "ce"))
    ce = Trainer(phase1, quiet=True)
    save_checkpoint(tmp_path / "phase1.pt", ce.checkpoint_payload())
    close_logger(ce.log)
    method = build_method(cfg.method)
    method.params.superior = str(tmp_path / "phase1.pt")
    trainer = Trainer(cfg, method=method, quiet=True)
    try:
        x, y, idx = next(iter(trainer.data.train_loader.iterate(0)))
        out, loss, _ = trainer.train_step(x, y, idx, 0, 0)
        assert out.logits.dtype == torch.bfloat16
        assert loss.dtype == torch.float32
        assert out.terms["critic_loss"].dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in method.critic.parameters())
        assert method.bank.table.dtype == torch.float16
    finally:
        close_logger(trainer.log)


@pytest.mark.parametrize("method", ["ce", "pskd", "dlb", "drg_dsr"])
def test_channels_last_gives_the_same_run(tiny_dict: dict[str, Any], method: str) -> None:
    plain = train(config_from_dict(_config(tiny_dict, "plain", method)), quiet=True)
    cl = train(config_from_dict(_config(tiny_dict, "cl", method, channels_last=True)), quiet=True)
    assert cl["test_top1_err"] == plain["test_top1_err"]
    assert cl["test_nll"] == pytest.approx(plain["test_nll"], abs=1e-5)


@pytest.mark.slow
def test_compile_keeps_feature_taps_across_runs_in_one_process(tiny_dict: dict[str, Any]) -> None:
    """A compiled CE run first fills dynamo's code cache for the model class; a compiled DRG+DSR
    run after it in the same process (a sweep, a phase 1 before phase 2) must still run the
    forward hooks its feature taps rely on, and match the uncompiled run."""
    finals = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("ce", "drg_dsr"):
            for compiled in (False, True):
                cfg = _config(tiny_dict, f"{method}-{compiled}", method, compile=compiled)
                finals[method, compiled] = train(config_from_dict(cfg), quiet=True)
    for method in ("ce", "drg_dsr"):
        plain, compiled = finals[method, False], finals[method, True]
        assert compiled["test_top1_err"] == plain["test_top1_err"]
        assert compiled["test_nll"] == pytest.approx(plain["test_nll"], abs=1e-5)


# --- CPU guards (selfkd.engine.cpu): what oneDNN's AVX2 kernels get wrong ----------------------

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
AVX512_FLAGS = {"avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "sse4_1"}


@pytest.mark.parametrize(
    ("flags", "tier"),
    [
        ({"sse4_1", "avx", "avx2", "fma"}, "avx2"),
        ({"sse4_1", "avx", "avx2", "avx_vnni"}, "avx2_vnni"),
        ({"sse4_1", "avx"}, "avx"),
        (AVX512_FLAGS, "avx512_core"),
        (AVX512_FLAGS | {"avx512_vnni"}, "avx512_core_vnni"),
        (AVX512_FLAGS | {"avx512_vnni", "avx512_bf16"}, "avx512_core_bf16"),
        (AVX512_FLAGS | {"avx512_bf16", "amx_bf16", "amx_tile"}, "avx10_1_512_amx"),
        ({"avx2", "avx512f"}, "avx2"),  # AVX-512 foundation alone is not oneDNN's avx512_core
    ],
)
def test_hardware_tier_from_cpu_flags(flags: set[str], tier: str) -> None:
    assert cpu.hardware_tier(flags) == tier


def test_onednn_tier_is_lowered_by_the_environment_never_raised() -> None:
    bf16 = AVX512_FLAGS | {"avx512_bf16"}
    assert cpu.onednn_tier(bf16, {}) == "avx512_core_bf16"
    assert cpu.onednn_tier(bf16, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "avx2"
    assert cpu.onednn_tier(bf16, {"DNNL_MAX_CPU_ISA": "avx512_core"}) == "avx512_core"
    assert cpu.onednn_tier(bf16, {"ONEDNN_MAX_CPU_ISA": "ALL"}) == "avx512_core_bf16"
    assert cpu.onednn_tier({"avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) == "avx2"
    assert cpu.onednn_tier({"neon"}, {}) is None  # not x86: no oneDNN x86 tier
    assert [cpu.native_bf16(t) for t in ("avx2", "avx512_core", "avx512_core_bf16")] == [
        False,
        False,
        True,
    ]


def test_hazardous_convolutions_are_the_thin_strided_1x1_ones() -> None:
    thin = build_model("resnet8", num_classes=4, in_channels=1, width=4)
    names = [name for name, _ in cpu.avx2_conv_hazards([thin])]
    # the option-B shortcut of stage 2 (4 -> 8 channels, stride 2); stage 3's has 8 inputs
    assert names == ["model.layer2.0.shortcut.0"]
    assert cpu.avx2_conv_hazards([build_model("resnet8", 4, in_channels=1, width=8)]) == []
    grouped = nn.Conv2d(4, 8, 1, stride=2, groups=2)
    frozen = nn.Conv2d(4, 8, 1, stride=2).requires_grad_(False)
    assert cpu.avx2_conv_hazards([nn.Sequential(grouped, frozen, nn.Conv2d(4, 8, 3, 2))]) == []
    head = nn.Sequential(nn.Conv2d(3, 6, 1, stride=(1, 2)))
    assert [n for n, _ in cpu.avx2_conv_hazards([thin, head])][1] == "Sequential.0"


def test_channels_last_refusal_names_the_layer_only_on_an_avx2_cpu() -> None:
    thin = build_model("resnet8", num_classes=4, in_channels=1, width=4)
    cpu_dev = torch.device("cpu")
    assert cpu.channels_last_refusal(torch.device("cuda"), [thin], tier="avx2") is None
    assert cpu.channels_last_refusal(cpu_dev, [thin], tier="avx512_core") is None
    assert cpu.channels_last_refusal(cpu_dev, [thin], tier="avx") is None
    assert cpu.channels_last_refusal(cpu_dev, [thin], tier="avx2") == (
        "oneDNN's avx2 kernels (no AVX-512 on this CPU or under ONEDNN_MAX_CPU_ISA) compute a "
        "wrong weight gradient, or crash with 1 thread, for the channels-last 1x1 stride-2 "
        "convolution model.layer2.0.shortcut.0 with 4 < 8 input channels"
    )


@pytest.mark.parametrize("tier", ["avx2", "avx512_core"])
def test_trainer_keeps_or_drops_channels_last_by_cpu_tier(
    tiny_dict: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tier: str
) -> None:
    """On an AVX2 tier the thin ResNet-8 trains in NCHW with one warning; elsewhere channels-last
    is applied to the model and the inputs. (No channels-last backward runs on AVX2 here.)"""
    monkeypatch.setattr(cpu, "onednn_tier", lambda *a, **k: tier)
    cfg = config_from_dict(_config(tiny_dict, f"cl-{tier}", "ce", channels_last=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, quiet=True)
    try:
        messages = [str(w.message) for w in caught if "channels_last" in str(w.message)]
        weight = trainer.model.layer1[0].conv1.weight  # 4 -> 4 channels, 3x3
        if tier == "avx2":
            assert messages == [
                "run.channels_last ignored: "
                + cpu.channels_last_refusal(torch.device("cpu"), [trainer.model], tier="avx2")
                + "; training in NCHW"
            ]
            assert not trainer.channels_last
            assert weight.is_contiguous()
        else:
            assert messages == [] and trainer.channels_last
            assert weight.is_contiguous(memory_format=torch.channels_last)
            assert not weight.is_contiguous()
    finally:
        close_logger(trainer.log)


def test_compile_turns_off_layout_optimisation_only_where_it_would_break() -> None:
    thin = build_model("resnet8", num_classes=4, in_channels=1, width=4)
    wide = build_model("resnet8", num_classes=4, in_channels=1, width=8)
    cpu_dev = torch.device("cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "onednn_tier", lambda *a, **k: "avx2")
        assert compile_options(cpu_dev, [thin]) == {"options": {"layout_optimization": False}}
        assert compile_options(cpu_dev, [wide]) == {}
        assert compile_options(torch.device("cuda"), [thin]) == {}
        mp.setattr(cpu, "onednn_tier", lambda *a, **k: "avx512_core_bf16")
        assert compile_options(cpu_dev, [thin]) == {}


@pytest.mark.parametrize(
    ("tier", "warned"), [("avx2", True), ("avx512_core", True), ("avx512_core_bf16", False)]
)
def test_bf16_on_a_cpu_without_native_bf16_warns_once(
    monkeypatch: pytest.MonkeyPatch, tier: str, warned: bool
) -> None:
    monkeypatch.setattr(device_mod, "onednn_tier", lambda *a, **k: tier)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
        assert amp_dtype("off", torch.device("cpu")) is None
    expected = (
        f"run.amp=bf16 on this CPU (oneDNN tier {tier}, no AVX512-BF16 or AMX) is emulated and "
        "slower than float32 (docs/benchmarks.md); run.amp=off trains faster"
    )
    assert [str(w.message) for w in caught] == ([expected] if warned else [])


def _subprocess(code: str, env: dict[str, str], threads: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env, "OMP_NUM_THREADS": str(threads)},
        capture_output=True,
        text=True,
        timeout=600,
    )


GRADIENT_SWEEP = """
import json, torch, torch.nn.functional as F
from torch import nn
from selfkd.engine.cpu import avx2_conv_hazards
torch.manual_seed(0)
out = []
for k, stride, cin in [(k, s, c) for k in (1, 3) for s in (1, 2) for c in (1, 2, 4, 7, 8, 12)]:
    conv = nn.Conv2d(cin, 8, k, stride=stride, padding=k // 2, bias=False)
    x = torch.randn(8, cin, 12, 12)
    ref = conv.weight.detach().double().requires_grad_()
    F.conv2d(x.double(), ref, stride=stride, padding=k // 2).square().sum().backward()
    conv.to(memory_format=torch.channels_last)
    conv(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
    err = ((conv.weight.grad - ref.grad).abs().max() / ref.grad.abs().max()).item()
    out.append([k, stride, cin, err, bool(avx2_conv_hazards([conv]))])
print(json.dumps(out))
"""


def test_the_guard_covers_every_wrong_avx2_gradient_of_a_sweep() -> None:
    """Under oneDNN's AVX2 tier (2 threads: 1 thread corrupts the heap), every channels-last
    convolution of the sweep whose weight gradient is wrong is one the guard refuses, and every
    shape the guard lets through matches the float64 reference."""
    proc = _subprocess(GRADIENT_SWEEP, AVX2_ENV, threads=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 24
    for k, stride, cin, err, hazard in rows:
        if not hazard:
            assert err < 1e-4, (k, stride, cin, err)
        assert hazard == (k == 1 and stride == 2 and cin < 8)


def test_thin_channels_last_run_with_one_thread_does_not_crash_on_avx2(
    tiny_dict: dict[str, Any], tmp_path: Path
) -> None:
    """The issue's crash (1 thread, channels-last, thin ResNet-8, oneDNN AVX2): in a subprocess,
    the CLI run ends with exit 0, one warning line, and the metrics of the plain NCHW run."""
    tiny_dict["train"]["epochs"] = 2
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    finals = {}
    for name, extra in (("plain", []), ("cl", ["--set", "run.channels_last=true"])):
        argv = ["-m", "selfkd", "train", "-c", str(config), "-q", "--set", f"run.name={name}"]
        proc = subprocess.run(
            [sys.executable, *argv, "--set", "run.threads=1", *extra],
            env={**os.environ, **AVX2_ENV},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        warned = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
        if name == "cl":
            assert warned == [
                "warning: run.channels_last ignored: oneDNN's avx2 kernels (no AVX-512 on this "
                "CPU or under ONEDNN_MAX_CPU_ISA) compute a wrong weight gradient, or crash with "
                "1 thread, for the channels-last 1x1 stride-2 convolution "
                "model.layer2.0.shortcut.0 with 4 < 8 input channels; training in NCHW"
            ]
        else:
            assert warned == []
        finals[name] = json.loads((tmp_path / "runs" / name / "final.json").read_text())
    assert finals["cl"]["test_top1_err"] == finals["plain"]["test_top1_err"]
    assert finals["cl"]["test_nll"] == finals["plain"]["test_nll"]


def test_wide_channels_last_run_is_kept_and_gives_the_same_run(tiny_dict: dict[str, Any]) -> None:
    """Width 8 has no thin strided 1x1 convolution: channels-last is applied on every CPU tier
    and the run matches the NCHW one."""
    tiny_dict["model"]["options"]["width"] = 8
    plain = train(config_from_dict(_config(tiny_dict, "plain8", "ce")), quiet=True)
    cfg = config_from_dict(_config(tiny_dict, "cl8", "ce", channels_last=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no channels-last warning
        trainer = Trainer(cfg, quiet=True)
    assert trainer.channels_last
    close_logger(trainer.log)
    trainer.run.release()
    cl = train(cfg, quiet=True, overwrite=True)
    assert cl["test_top1_err"] == plain["test_top1_err"]
    assert cl["test_nll"] == pytest.approx(plain["test_nll"], abs=1e-5)


def test_each_cpu_capability_gets_its_own_compile_cache(tmp_path: Path) -> None:
    default = cpu._default_compile_cache()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    env: dict[str, str] = {}
    assert cpu.isolate_compile_cache(env) == f"{default}-{capability}"
    env = {"TORCHINDUCTOR_CACHE_DIR": default}  # set by inductor itself earlier
    assert cpu.isolate_compile_cache(env) == f"{default}-{capability}"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}  # the user's choice stays
    assert cpu.isolate_compile_cache(env) == str(tmp_path / "mine")


@pytest.mark.slow
def test_compiled_runs_under_two_cpu_capabilities_share_no_kernels(
    tiny_dict: dict[str, Any], tmp_path: Path
) -> None:
    """A compiled run under the AVX2 setting, then the same run natively, with inductor's default
    cache location (under TMPDIR): both exit 0 (a shared cache made the second one segfault),
    each capability with its own cache directory."""
    tiny_dict["train"]["epochs"] = 1
    tiny_dict["run"]["compile"] = True
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_dict))
    base = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    base.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    no_isa = {k: v for k, v in base.items() if k not in AVX2_ENV}
    for name, env in (("avx2", {**no_isa, **AVX2_ENV}), ("native", no_isa)):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "selfkd",
                "train",
                "-c",
                str(config),
                "-q",
                *("--set", f"run.name={name}"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, (name, proc.returncode, proc.stderr[-2000:])
    # the native capability, as the second subprocess saw it (this process may be capped)
    native = (
        subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
            env=no_isa,
            capture_output=True,
            text=True,
            timeout=300,
        )
        .stdout.strip()
        .lower()
    )
    kernels = {
        p.name: len(list(p.rglob("*.so")))
        for p in tmp_path.iterdir()
        if p.name.startswith("torchinductor_")
    }
    user = Path(cpu._default_compile_cache()).name  # inductor keeps only precompiled headers there
    assert kernels.pop(user, 0) == 0
    assert sorted(kernels) == sorted({f"{user}-avx2", f"{user}-{native}"})
    assert all(kernels.values())
