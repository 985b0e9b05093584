"""Distributed training: 2 processes launched by torchrun (gloo, CPU) on tiny synthetic data.

Each test writes a small worker script and a JSON list of jobs into ``tmp_path`` and launches
``torchrun --standalone --nproc_per_node=2`` on it. The worker trains the jobs one after the
other (the process group is shared by consecutive trainers, as phase 1 and phase 2 are) and saves
every rank's model and method tensors after every epoch, so the test can compare the ranks.

Tolerance of the 1- vs 2-process comparison (same global batch 16, same data order, no random
augmentation): with a BatchNorm-free model the two runs compute the same global-batch mean
gradient, so the epoch-1 training loss agrees to float32 rounding (we allow 1e-5). With
BatchNorm (resnet8), each DDP rank normalizes with the statistics of its own 8 samples instead of
the global 16 (``run.sync_bn`` would fix it, CUDA only): the forward pass itself differs, so the
losses differ slightly; we allow 0.05 absolute on a loss of about ln 4 = 1.39 (we measured about
0.01).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

#: the tiny run of helpers.TINY (3 steps per epoch) without random augmentation (ranks draw
#: other augmentations than a single process), checked every 2 steps: a signal is acted on at
#: the next even global step
BASE: dict[str, Any] = copy.deepcopy(TINY)
BASE["run"].update(name="r", check_every=2)
BASE["data"]["augment"] = {"crop_padding": 0, "hflip": False}

#: a model without BatchNorm (built in the workers and in the test process alike)
NOBN = textwrap.dedent(
    """
    from torch import nn


    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
            )
            self.classifier = nn.Linear(16, 4)

        def forward(self, x):
            return self.classifier(self.features(x))
    """
)

WORKER = NOBN + textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from selfkd.config import config_from_dict
    from selfkd.engine.runner import train
    from selfkd.errors import RunInterrupted

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    jobs = json.loads(open(sys.argv[1]).read())

    for job in jobs:
        out = job["dump"]
        os.makedirs(out, exist_ok=True)

        def dump(trainer, epoch, out=out, job=job):
            state = {
                "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                "method": {
                    k: v.clone()
                    for k, v in trainer.method.state_dict().items()
                    if isinstance(v, torch.Tensor)
                },
            }
            opt = getattr(trainer.method, "critic_optimizer", None)
            if opt is not None:
                for i, s in opt.state_dict()["state"].items():
                    for k, v in s.items():
                        state["method"][f"critic_opt.{i}.{k}"] = v.clone()
            torch.save(state, os.path.join(out, f"rank{rank}_epoch{epoch}.pt"))
            if job.get("interrupt_epoch") == epoch and rank == job.get("interrupt_rank", 1):
                os.kill(os.getpid(), signal.SIGTERM)  # one rank only: all must stop together

        kwargs = {"model": NoBN()} if job.get("nobn") else {}
        try:
            final = train(
                config_from_dict(job["config"]),
                resume=job.get("resume", False),
                quiet=True,
                callbacks=[dump],
                **kwargs,
            )
        except RunInterrupted as exc:
            final = {"status": "interrupted", "message": str(exc)}
        with open(os.path.join(out, f"final_rank{rank}.json"), "w") as handle:
            json.dump(final, handle)
    """
)


def config(tmp_path: Path, name: str, method: dict[str, Any], **changes: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    cfg["run"]["name"] = name
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    cfg["method"] = method
    for key, value in changes.items():
        section, field = key.split("__")
        cfg[section][field] = value
    return cfg


def torchrun(tmp_path: Path, jobs: list[dict[str, Any]], tag: str) -> None:
    """Run ``jobs`` in 2 processes; fail with the workers' output if the launch fails."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    spec = tmp_path / f"jobs_{tag}.json"
    spec.write_text(json.dumps(jobs))
    launch(tmp_path, worker, spec)


def launch(tmp_path: Path, script: Path, *args: Path) -> None:
    """``torchrun --standalone --nproc_per_node=2 script args...`` (fails with the output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def load_rank(dump: Path, rank: int, epoch: int) -> dict[str, Any]:
    return torch.load(dump / f"rank{rank}_epoch{epoch}.pt", weights_only=True)


def assert_ranks_identical(dump: Path, epoch: int) -> list[str]:
    a, b = load_rank(dump, 0, epoch), load_rank(dump, 1, epoch)
    names = []
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs between ranks"
            names.append(f"{part}.{key}")
    return names


def final(dump: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((dump / f"final_rank{rank}.json").read_text())


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


METHODS = {
    "pskd": {"name": "pskd"},
    # the paper's BatchNorm critic: its running statistics must stay identical across ranks too
    "aikd": {"name": "aikd", "critic_norm": "batchnorm"},
    # per-rank method state: each rank distils its own previous batch, also after a resume
    "dlb": {"name": "dlb"},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_identical_ranks_rank0_files_and_exact_resume(
    tmp_path: Path, method: str
) -> None:
    full = config(tmp_path, "full", METHODS[method])
    cut = config(tmp_path, "cut", METHODS[method])
    torchrun(
        tmp_path,
        [
            {"config": full, "dump": str(tmp_path / "d_full")},
            {"config": cut, "dump": str(tmp_path / "d_cut"), "interrupt_epoch": 1},
        ],
        "first",
    )
    dump = tmp_path / "d_full"
    run = tmp_path / "runs" / "full"
    # every rank holds the same bank, model (incl. BatchNorm statistics), critic and its Adam
    names = assert_ranks_identical(dump, 3)
    has_bank = method in ("pskd", "aikd")
    if has_bank:
        assert "method.bank.table" in names
        bank = load_rank(dump, 0, 3)["method"]["bank.table"]
        assert torch.isfinite(bank).any(dim=1).all()  # rows were written (not one-hot only)
        assert (bank > -float("inf")).sum() > bank.shape[0]  # soft rows from both ranks
    if method == "aikd":
        assert any(n.startswith("method.critic.") for n in names)
        assert any(n.startswith("method.critic_opt.") for n in names)
        assert any("running_mean" in n for n in names if n.startswith("method.critic."))
    if method == "dlb":  # the checkpoint holds each rank's own previous batch
        state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        prev = [r["prev"]["targets"] for r in state["method_ranks"]]
        assert len(prev) == 2 and not torch.equal(prev[0], prev[1])

    # only rank 0 wrote: one log start line, one row per epoch, final.json, checkpoints
    log = (run / "train.log").read_text().splitlines()
    assert sum(f": method {method}, model" in line for line in log) == 1
    assert sum("epoch 1/3" in line for line in log) == 1
    assert sum("finished:" in line for line in log) == 1
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
    assert (run / "final.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert not list(run.glob("**/*.tmp")) and not list(run.glob(".write-test"))
    f0, f1 = final(dump, 0), final(dump, 1)  # both ranks return the same test metrics
    assert {k: v for k, v in f0.items() if k.startswith("test_")} == {
        k: v for k, v in f1.items() if k.startswith("test_")
    }
    if method == "aikd":  # phase 1 ran as a DDP run too, written once
        phase1 = list((tmp_path / "runs" / "_phase1").glob("*/train.log"))
        assert len(phase1) == 1
        assert sum("finished:" in line for line in phase1[0].read_text().splitlines()) == 1

    # SIGTERM on rank 1 only: both ranks stop after the same step, rank 0 checkpoints
    stopped = final(tmp_path / "d_cut", 0)
    assert stopped["status"] == "interrupted" == final(tmp_path / "d_cut", 1)["status"]
    assert "epoch 2, step 1/3" in stopped["message"]
    # resume under torchrun: continues, finishes, and matches the uninterrupted run exactly
    torchrun(
        tmp_path,
        [{"config": cut, "dump": str(tmp_path / "d_resumed"), "resume": True}],
        "resume",
    )
    resumed = final(tmp_path / "d_resumed", 0)
    assert resumed["status"] == "finished"
    assert_ranks_identical(tmp_path / "d_resumed", 3)
    keys = ["test_top1_err", "test_nll", "test_ece"]
    assert {k: resumed[k] for k in keys} == pytest.approx({k: final(dump)[k] for k in keys})
    full_rows, cut_rows = metrics(run), metrics(tmp_path / "runs" / "cut")
    assert [r["train_loss"] for r in cut_rows] == pytest.approx(
        [r["train_loss"] for r in full_rows], rel=1e-6
    )
    a, b = load_rank(dump, 0, 3), load_rank(tmp_path / "d_resumed", 0, 3)
    # BatchNorm statistics are averaged over ranks at the stop as well as at the epoch end:
    # equal up to float rounding, not bit for bit
    torch.testing.assert_close(a["model"], b["model"], rtol=1e-5, atol=1e-6)
    if has_bank:
        assert torch.equal(a["method"]["bank.table"], b["method"]["bank.table"])


@pytest.mark.slow
def test_one_vs_two_processes_same_global_batch(tmp_path: Path) -> None:
    from selfkd.config import config_from_dict
    from selfkd.engine.runner import train

    jobs = []
    for name, nobn in (("bn", False), ("nobn", True)):
        cfg = config(tmp_path, f"ddp_{name}", {"name": "pskd"}, train__epochs=1)
        jobs.append({"config": cfg, "dump": str(tmp_path / f"d_{name}"), "nobn": nobn})
    torchrun(tmp_path, jobs, "cmp")

    namespace: dict[str, Any] = {}
    exec(NOBN, namespace)
    losses = {}
    for name, nobn in (("bn", False), ("nobn", True)):
        cfg = config(tmp_path, f"single_{name}", {"name": "pskd"}, train__epochs=1)
        kwargs = {"model": namespace["NoBN"]()} if nobn else {}
        train(config_from_dict(cfg), quiet=True, **kwargs)
        one = metrics(tmp_path / "runs" / f"single_{name}")[0]["train_loss"]
        two = metrics(tmp_path / "runs" / f"ddp_{name}")[0]["train_loss"]
        losses[name] = (one, two)
    print(f"epoch-1 train loss (1 process, 2 processes): {losses}")
    one, two = losses["nobn"]
    assert two == pytest.approx(one, abs=1e-5), losses
    one, two = losses["bn"]
    assert two == pytest.approx(one, abs=0.05), losses  # per-rank BatchNorm statistics


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "spec"),
    [
        ("cskd", {"name": "cskd"}),
        ("dlb", {"name": "dlb"}),
        ("stack", {"name": "stack", "parts": {"pskd": {}, "drg": {}}}),  # a bank + hooks + heads
    ],
)
def test_cskd_sampler_dlb_and_a_stack_run_under_two_processes(
    tmp_path: Path, method: str, spec: dict[str, Any]
) -> None:
    cfg = config(tmp_path, method, spec, train__epochs=2)
    torchrun(tmp_path, [{"config": cfg, "dump": str(tmp_path / "d")}], method)
    assert final(tmp_path / "d", 0)["status"] == "finished"
    assert_ranks_identical(tmp_path / "d", 2)
    rows = metrics(tmp_path / "runs" / method)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # finite, reduced over ranks


@pytest.mark.slow
def test_batch_size_must_divide_by_world_size(tmp_path: Path) -> None:
    cfg = config(tmp_path, "odd", {"name": "ce"}, train__epochs=1)
    cfg["data"]["batch_size"] = 15
    worker_job = [{"config": cfg, "dump": str(tmp_path / "d")}]
    with pytest.raises(AssertionError, match="global batch and must be divisible"):
        torchrun(tmp_path, worker_job, "odd")


# --- top-k bank storage (fast; not launched with torchrun) ---------------------------------------
TOPK_LABELS = torch.tensor([2, 0, 1, 2, 3, 0])


def _log_softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return (
        z
        - z.max(1, keepdim=True).values
        - (z - z.max(1, keepdim=True).values).exp().sum(1, keepdim=True).log()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_bank_exact_when_k_equals_classes(dtype: torch.dtype) -> None:
    from selfkd.banks import PredictionBank

    dense = PredictionBank(6, 4, TOPK_LABELS, dtype=dtype)
    topk = PredictionBank(6, 4, TOPK_LABELS, dtype=dtype, storage="topk", topk=4)
    idx = torch.arange(6)
    assert torch.equal(topk.lookup(idx), dense.lookup(idx))  # one-hot start
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)) * 3
    dense.update(idx, z)
    topk.update(idx, z)
    assert torch.equal(topk.lookup(idx), dense.lookup(idx))


def test_topk_bank_error_bound_and_normalization() -> None:
    from selfkd.banks import PredictionBank

    n, classes, k = 64, 50, 5
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(classes, (n,), generator=g)
    bank = PredictionBank(n, classes, labels, dtype=torch.float32, storage="topk", topk=k)
    z = torch.randn(n, classes, generator=g) * 4
    idx = torch.randperm(n, generator=g)
    bank.update(idx, z[idx])
    exact = _log_softmax64(z).exp()
    got = bank.probs(torch.arange(n)).double()
    top, _ = exact.sort(dim=1, descending=True)
    # kept entries exact; every other entry off by at most the (k+1)-th largest probability
    assert (got - exact).abs().max(1).values.le(top[:, k] + 1e-6).all()
    kept = exact >= top[:, k - 1 : k]
    assert torch.allclose(got[kept], exact[kept], rtol=1e-5, atol=1e-7)
    # rows still sum to 1; total variation at most the non-kept mass
    assert torch.allclose(got.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-5)
    tv = 0.5 * (got - exact).abs().sum(1)
    assert tv.le(1 - top[:, :k].sum(1) + 1e-6).all()
    # the non-kept entries share the remaining mass evenly (hand computation for one row)
    row = exact[0]
    rest = (1 - row.sort(descending=True).values[:k].sum()) / (classes - k)
    assert got[0][~kept[0]] == pytest.approx(torch.full(((~kept[0]).sum(),), rest).numpy())
    # one-hot start and reset
    fresh = PredictionBank(n, classes, labels, storage="topk", topk=k)
    assert torch.equal(fresh.probs(torch.arange(n)), torch.eye(classes)[labels])
    assert fresh.nbytes == n * (k * (2 + 2) + 4)


def test_topk_bank_state_round_trip_and_validation() -> None:
    from selfkd.banks import PredictionBank, bank_nbytes
    from selfkd.errors import ConfigError

    bank = PredictionBank(6, 4, TOPK_LABELS, storage="topk", topk=2)
    bank.update(torch.tensor([0, 3, 0]), torch.randn(3, 4))
    other = PredictionBank(6, 4, TOPK_LABELS, storage="topk", topk=2)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.lookup(torch.arange(6)), bank.lookup(torch.arange(6)))
    with pytest.raises(ConfigError, match="topk"):
        PredictionBank(6, 4, TOPK_LABELS, storage="topk", topk=5)
    with pytest.raises(ConfigError, match="storage"):
        PredictionBank(6, 4, TOPK_LABELS, storage="sparse")
    assert bank_nbytes(1_281_167, 1000, "float16") == 1_281_167 * 1000 * 2


def test_duplicate_indices_keep_the_last_row() -> None:
    from selfkd.banks import PredictionBank

    bank = PredictionBank(6, 4, TOPK_LABELS, dtype=torch.float32)
    z = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    bank.update(torch.tensor([1, 1, 1]), z)
    assert torch.equal(bank.lookup(torch.tensor([1]))[0], torch.log_softmax(z[2], 0))


@pytest.mark.parametrize("method", ["pskd", "aikd"])
def test_bank_topk_param(tmp_path: Path, method: str) -> None:
    from selfkd.config import config_from_dict
    from selfkd.engine.trainer import Trainer
    from selfkd.errors import ConfigError

    spec = {"name": method, "bank_topk": 2}
    if method == "aikd":
        spec.update(ablation="only_progressive")
    cfg = config(tmp_path, f"topk_{method}", spec, train__epochs=1)
    trainer = Trainer(config_from_dict(cfg), quiet=True)
    assert trainer.method.bank.storage == "topk" and trainer.method.bank.topk == 2
    trainer.fit()
    spec["bank_topk"] = 9
    with pytest.raises(ConfigError, match="bank_topk 9 exceeds the 4 classes"):
        Trainer(config_from_dict(config(tmp_path, f"bad_{method}", spec)), quiet=True)


GATHER_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from selfkd.banks import PredictionBank
    from selfkd.engine.distributed import all_gather_rows
    from selfkd.engine.hostsync import count_host_reads

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    # unequal row counts; sample 5 on both ranks (rank 1's row is the later one and must win)
    idx = torch.tensor([0, 5, 2]) if rank == 0 else torch.tensor([5])
    rows = torch.randn(idx.numel(), 4)
    out = {"rows": rows}
    for cap in (None, 4):
        bank = PredictionBank(8, 4, torch.zeros(8, dtype=torch.long), dtype=torch.float32)
        with count_host_reads() as reads:
            bank.update(idx, rows, gather=lambda i, r, cap=cap: all_gather_rows(i, r, cap=cap))
        out[f"table_{cap}"] = bank.table.clone()
        out[f"reads_{cap}"] = torch.tensor(reads.count)
    torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_padded_row_gather_equals_the_exact_one_without_host_reads(tmp_path: Path) -> None:
    script = tmp_path / "gather_worker.py"
    script.write_text(GATHER_WORKER)
    launch(tmp_path, script, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for r in (r0, r1):  # both ranks, with and without the cap: the same bank
        assert torch.equal(r["table_None"], r0["table_4"]) and torch.equal(
            r["table_4"], r0["table_4"]
        )
    table = r0["table_4"]
    expect = torch.log_softmax(r0["rows"], dim=1)
    assert torch.allclose(table[0], expect[0]) and torch.allclose(table[2], expect[2])
    assert torch.allclose(table[5], torch.log_softmax(r1["rows"][0], dim=0))  # the last one
    # untouched rows keep their one-hot log-probabilities (label 0 here)
    assert torch.equal(table[1], torch.tensor([0.0, -math.inf, -math.inf, -math.inf]))
    assert int(r0["reads_4"]) == 0 and int(r0["reads_None"]) > 0  # the cap avoids the count read


NAN_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.nn.functional as F
    from selfkd.config import config_from_dict
    from selfkd.engine.runner import train
    from selfkd.errors import TrainingError
    from selfkd.methods import METHODS, Method, StepOutput

    rank = int(os.environ["RANK"])

    @METHODS.register("_nan_on_rank1")
    class NanOnRank1(Method):
        name = "_nan_on_rank1"

        def training_step(self, model, batch, info):
            logits = model(batch.inputs)
            loss = F.cross_entropy(logits, batch.targets)
            # a term (as a diverged AI-KD critic) goes NaN on rank 1 only, at global step 4
            term = torch.full((), float("nan") if rank == 1 and info.global_step == 4 else 0.0)
            return StepOutput(loss, logits, batch.targets, {"critic_loss": term})

    torch.set_num_threads(1)
    config = json.loads(open(sys.argv[1]).read())
    try:
        train(config_from_dict(config), quiet=True)
        result = {"status": "finished"}
    except TrainingError as exc:
        result = {"status": "stopped", "message": str(exc)}
    with open(os.path.join(os.path.dirname(sys.argv[1]), f"nan_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.slow
def test_a_nonfinite_term_on_one_rank_stops_every_rank_at_the_same_check(tmp_path: Path) -> None:
    cfg = config(tmp_path, "nan", {"name": "_nan_on_rank1"})  # 3 steps/epoch, check_every 2
    (tmp_path / "nan.json").write_text(json.dumps(cfg))
    script = tmp_path / "nan_worker.py"
    script.write_text(NAN_WORKER)
    launch(tmp_path, script, tmp_path / "nan.json")
    r0 = json.loads((tmp_path / "nan_rank0.json").read_text())
    r1 = json.loads((tmp_path / "nan_rank1.json").read_text())
    assert r0["status"] == r1["status"] == "stopped"  # no rank hangs in a collective
    # rank 1 names its first bad step and the term; rank 0 learns it from the shared check
    assert "epoch 2, step 2 (global step 4); terms: critic_loss=nan" in r1["message"]
    assert "non-finite loss on another rank" in r0["message"]
    run = tmp_path / "runs" / "nan"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # nothing written after the bad step
    final_json = json.loads((run / "final.json").read_text())
    assert final_json["status"] == "failed"
