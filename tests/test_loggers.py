"""Experiment trackers (run.loggers) through their official clients, offline / local stores;
run.log_every; the run metadata in config.yaml and final.json."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import read_final, read_rows
from selfkd.config import config_from_dict, load_config
from selfkd.engine import Trainer, train
from selfkd.engine import loggers as L
from selfkd.errors import ConfigError


def _train(tiny_dict: dict[str, Any], loggers: list[str], epochs: int = 2, **run: Any) -> Path:
    tiny_dict["train"]["epochs"] = epochs
    tiny_dict["run"]["loggers"] = loggers
    tiny_dict["run"].update(run)
    cfg = config_from_dict(tiny_dict)
    train(cfg, quiet=True)
    return Path(cfg.run.out_dir) / cfg.run.name


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}


# --- W&B, offline -----------------------------------------------------------------------------
def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``): the LevelDB log format
    (32 KiB blocks; 7-byte chunk headers: crc32, length, type) after a 7-byte file header,
    each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_config_every_epoch_row_and_final_metrics(
    tiny_dict, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _train(tiny_dict, ["csv", "wandb"])
    (log,) = (tmp_path / "wb").rglob("offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    run_id = json.loads((run / L.IDS_FILE).read_text())["wandb"]
    assert log.name == f"run-{run_id}.wandb"

    config: dict[str, Any] = {}
    history: dict[int, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({_key(i): json.loads(i.value_json) for i in items})
        elif kind == "history":
            values = {_key(i): json.loads(i.value_json) for i in record.history.item}
            history[values["_step"]] = values
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})

    assert config["run"]["seed"] == 0 and config["model"]["name"] == "resnet8"
    assert config["method"]["name"] == "ce"
    assert config["meta"]["world_size"] == 1
    rows = read_rows(run)
    assert sorted(history) == [1, 2]
    for row in rows:
        logged = history[row["epoch"]]
        for key, value in _numbers(row).items():
            assert logged[key] == pytest.approx(value, rel=1e-12), key
    final = read_final(run)
    assert summary["final/test_top1_err"] == pytest.approx(final["test_top1_err"])
    assert summary["final/test_nll"] == pytest.approx(final["test_nll"])


# --- MLflow, local file store -------------------------------------------------------------------
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no database store
    return uri


def _mlflow_runs(project: str = "selfkd") -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(project)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id])


def test_mlflow_run_holds_params_every_epoch_row_and_final_metrics(tiny_dict, mlflow_store):
    from mlflow.tracking import MlflowClient

    run = _train(tiny_dict, ["csv", "mlflow"], project="tiny-study")
    (found,) = _mlflow_runs("tiny-study")
    assert found.info.status == "FINISHED"
    assert found.info.run_name == "tiny"
    assert json.loads((run / L.IDS_FILE).read_text())["mlflow"] == found.info.run_id
    params = found.data.params
    assert params["run.seed"] == "0" and params["data.batch_size"] == "16"
    assert params["method.name"] == "ce" and params["meta.world_size"] == "1"
    client = MlflowClient()
    rows = read_rows(run)
    for key in _numbers(rows[0]):
        history = client.get_metric_history(found.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [
            (r["epoch"], pytest.approx(r[key], rel=1e-12)) for r in rows
        ], key
    final = read_final(run)
    assert found.data.metrics["final/test_top1_err"] == pytest.approx(final["test_top1_err"])
    assert found.data.metrics["final/test_ece"] == pytest.approx(final["test_ece"])


def test_resume_continues_the_same_mlflow_run(tiny_dict, mlflow_store):
    tiny_dict["train"]["epochs"] = 2
    tiny_dict["run"]["loggers"] = ["mlflow"]
    cfg = config_from_dict(tiny_dict)

    class Stop(Exception):
        pass

    def stop(trainer: Trainer, epoch: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        Trainer(cfg, quiet=True, callbacks=[stop]).fit()
    train(cfg, resume=True, quiet=True)
    (found,) = _mlflow_runs()
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient().get_metric_history(found.info.run_id, "train_loss")]
    assert steps == [1, 2]
    assert found.info.status == "FINISHED"


def test_unreachable_tracking_server_is_one_warning_and_training_goes_on(tiny_dict, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    run = _train(tiny_dict, ["csv", "mlflow"])
    assert read_final(run)["status"] == "finished"
    assert [r["epoch"] for r in read_rows(run)] == [1, 2]
    assert (run / "metrics.csv").read_text().count("\n") == 3
    warnings = [ln for ln in (run / "train.log").read_text().splitlines() if "warning:" in ln]
    assert len(warnings) == 1
    assert "mlflow logging could not start" in warnings[0]
    assert "training goes on" in warnings[0]


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(tiny_dict, monkeypatch):
    seen: list[int] = []

    class Flaky(L.Tracker):
        name = "tensorboard"

        def __init__(self, run_dir: Path, **_: Any) -> None:
            pass

        def log_epoch(self, row: dict[str, Any]) -> None:
            seen.append(row["epoch"])
            if row["epoch"] == 2:
                raise OSError("disk full")

    monkeypatch.setitem(L.TRACKERS, "tensorboard", Flaky)
    run = _train(tiny_dict, ["csv", "tensorboard"], epochs=3)
    assert seen == [1, 2]  # dropped after its failure
    assert [r["epoch"] for r in read_rows(run)] == [1, 2, 3]
    warnings = [ln for ln in (run / "train.log").read_text().splitlines() if "warning:" in ln]
    assert len(warnings) == 1
    assert "tensorboard logging failed (OSError: disk full)" in warnings[0]


# --- TensorBoard ------------------------------------------------------------------------------
def test_tensorboard_event_file_holds_every_epoch_row_config_and_final(tiny_dict):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tiny_dict, ["tensorboard"])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    rows = read_rows(run)
    for key in _numbers(rows[0]):
        tag = key.replace("_", "/", 1)
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    final = read_final(run)
    (value,) = events.Scalars("final/test_top1_err")
    assert value.value == pytest.approx(final["test_top1_err"], rel=1e-6)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "seed: 0" in text and "world_size: 1" in text


def test_a_single_logger_name_is_a_list_of_one():
    from selfkd.config import apply_overrides

    cfg = config_from_dict(apply_overrides({}, ["run.loggers=wandb"]))
    assert cfg.run.loggers == ["wandb"]
    with pytest.raises(ConfigError, match=r"run\.loggers\[0\] must be a string, got 3"):
        config_from_dict({"run": {"loggers": [3]}})


def test_run_tensorboard_true_still_means_the_tensorboard_logger():
    cfg = config_from_dict({"run": {"tensorboard": True}})
    assert L.logger_names(cfg.run) == ["csv", "tensorboard"]
    cfg = config_from_dict({"run": {"loggers": ["wandb", "csv", "wandb"]}})
    assert L.logger_names(cfg.run) == ["csv", "wandb"]


# --- bad input --------------------------------------------------------------------------------
def test_unknown_logger_is_one_line_with_the_choices():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"run": {"loggers": ["csv", "wandbb"]}})
    assert str(err.value) == (
        "run.loggers: unknown logger 'wandbb' (did you mean: wandb?); "
        "choose from csv, tensorboard, wandb, mlflow"
    )


@pytest.mark.parametrize(
    ("name", "module", "extra"),
    [
        ("wandb", "wandb", "wandb"),
        ("mlflow", "mlflow.tracking", "mlflow"),
        ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
    ],
)
def test_missing_client_is_one_line_naming_the_extra_before_the_run_starts(
    tiny_dict, monkeypatch, name, module, extra
):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    tiny_dict["run"]["loggers"] = ["csv", name]
    cfg = config_from_dict(tiny_dict)
    with pytest.raises(ConfigError) as err:
        train(cfg, quiet=True)
    assert str(err.value) == (
        f"run.loggers includes {name} but its client is not installed; "
        f"pip install 'selfkd[{extra}]' (or remove {name} from run.loggers)"
    )
    assert not (Path(cfg.run.out_dir) / cfg.run.name).exists()  # nothing started


def test_missing_client_from_the_cli_is_error_line_and_exit_2(
    tiny_dict, tmp_path, monkeypatch, capsys
):
    from selfkd.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    path = tmp_path / "c.yaml"
    tiny_dict["run"]["loggers"] = ["wandb"]
    path.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", "-c", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: run.loggers includes wandb but its client is not installed; "
        "pip install 'selfkd[wandb]' (or remove wandb from run.loggers)"
    )


# --- log_every --------------------------------------------------------------------------------
def test_log_every_writes_a_step_line_every_n_steps(tiny_dict):
    # TINY: 48 training images, batch 16 -> 3 steps per epoch; log_every 2 -> step 2 only
    run = _train(tiny_dict, ["csv"], epochs=2, log_every=2, progress="off")
    lines = (run / "train.log").read_text().splitlines()
    steps = [ln.split(" ", 2)[2] for ln in lines if " step " in ln]
    assert len(steps) == 2
    # milestones [0.5, 0.75] of 2 epochs: lr 0.05 in epoch 1, 0.005 in epoch 2
    for (epoch, lr), line in zip(((1, "0.05"), (2, "0.005")), steps, strict=True):
        pattern = rf"epoch {epoch}/2 step 2/3 loss=\d+\.\d{{4}} lr={re.escape(lr)} \(\d+\.\ds\)"
        assert re.fullmatch(pattern, line), line


def test_log_every_zero_writes_epoch_lines_only(tiny_dict):
    run = _train(tiny_dict, ["csv"], epochs=2, progress="off")
    assert " step " not in (run / "train.log").read_text()


# --- run metadata -----------------------------------------------------------------------------
def test_config_and_final_record_the_environment(tiny_dict):
    import selfkd

    run = _train(tiny_dict, ["csv"], epochs=1)
    meta = yaml.safe_load((run / "config.yaml").read_text())["meta"]
    final = read_final(run)
    for key in ("selfkd", "git_commit", "host", "world_size", "device_name", "device_count"):
        assert final[key] == meta[key], key
    assert meta["selfkd"] == selfkd.__version__
    assert meta["world_size"] == 1 and meta["device_count"] == 1
    assert meta["host"] and meta["device_name"]
    root = Path(selfkd.__file__).resolve().parents[2]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert meta["git_commit"].removesuffix("+dirty") == head
    # config.yaml is still a valid config: the meta section is ignored when read back
    assert (
        load_config(run / "config.yaml").to_dict()
        == config_from_dict(
            {
                k: v
                for k, v in yaml.safe_load((run / "config.yaml").read_text()).items()
                if k != "meta"
            }
        ).to_dict()
    )


@pytest.mark.slow
def test_two_processes_log_one_tracker_run_from_rank_0_and_record_world_size_2(
    tmp_path, mlflow_store
):
    from test_distributed import config, torchrun

    cfg = config(tmp_path, "ddp", {"name": "ce"}, train__epochs=2, run__loggers=["mlflow"])
    torchrun(tmp_path, [{"config": cfg, "dump": str(tmp_path / "dump")}], "loggers")
    run = tmp_path / "runs" / "ddp"
    (found,) = _mlflow_runs()  # rank 1 started none
    assert found.info.status == "FINISHED"
    assert found.data.params["meta.world_size"] == "2"
    assert yaml.safe_load((run / "config.yaml").read_text())["meta"]["world_size"] == 2
    assert read_final(run)["world_size"] == 2
    assert found.data.metrics["final/test_top1_err"] == pytest.approx(
        read_final(run)["test_top1_err"]
    )
