"""Experiment trackers: ``run.loggers: [csv, tensorboard, wandb, mlflow]``.

``csv`` is always on: it is the run directory's own ``metrics.csv``/``metrics.jsonl``
(:class:`~selfkd.engine.rundir.RunDir`). The others go through their official clients, each an
optional extra (``pip install 'selfkd[wandb]'``); naming one whose client is not installed is a
one-line :class:`~selfkd.errors.ConfigError` naming the extra, raised before the run starts.

Each tracker receives the resolved config (plus the run's environment, ``meta``), every
per-epoch row (lr, every loss term, train/val/test metrics, seconds; the epoch is the step) and
the final metrics (as ``final/<key>``). Settings beyond ``run.project`` (the W&B project and
MLflow experiment) come from the clients' own environment variables (``WANDB_MODE``,
``WANDB_ENTITY``, ``WANDB_DIR``, ``MLFLOW_TRACKING_URI``, ...).

A tracker that fails (no server, no login, a full disk) is reported with one warning and
dropped; training goes on and the CSV is still written. The tracker's run id is kept in
``RUN/trackers.json`` so that ``--resume`` continues the same W&B / MLflow run.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from selfkd.config import LOGGERS, dump_yaml
from selfkd.engine.checkpoint import atomic_write_text
from selfkd.errors import ConfigError

#: the module each tracker's client provides, and the selfkd extra that installs it
CLIENTS: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow.tracking", "mlflow"),
}
IDS_FILE = "trackers.json"


def logger_names(run_cfg: Any) -> list[str]:
    """The trackers a run config asks for, csv first (``run.tensorboard: true`` adds
    tensorboard)."""
    names = ["csv", *(n for n in run_cfg.loggers if n != "csv")]
    if getattr(run_cfg, "tensorboard", False) and "tensorboard" not in names:
        names.append("tensorboard")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(
                f"run.loggers: unknown logger {name!r}; choose from {', '.join(LOGGERS)}"
            )
    return list(dict.fromkeys(names))


def require_clients(names: Iterable[str]) -> None:
    """ConfigError (one line, naming the extra) for the first tracker whose client is missing."""
    for name in names:
        if name not in CLIENTS:
            continue
        module, extra = CLIENTS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"run.loggers includes {name} but its client is not installed; "
                f"pip install 'selfkd[{extra}]' (or remove {name} from run.loggers)"
            ) from None


def scalars(values: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite numbers of ``values`` (booleans and non-numbers left out)."""
    out = {}
    for key, value in values.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"run": {"seed": 0}}`` -> ``{"run.seed": 0}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


class Tracker:
    """One experiment tracker. ``status`` in :meth:`close`: finished, failed or interrupted."""

    name = "tracker"

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_epoch(self, row: dict[str, Any]) -> None: ...

    def log_final(self, final: dict[str, Any], step: int) -> None: ...

    def close(self, status: str) -> None: ...

    @property
    def run_id(self) -> str | None:
        return None


class TensorBoardTracker(Tracker):
    """Event files in ``RUN/tensorboard`` (tags ``train/loss``, ``test/top1_err``, ...)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log_config(self, config: dict[str, Any]) -> None:
        text = "\n".join(f"    {line}" for line in dump_yaml(config).splitlines())
        self.writer.add_text("config", text, 0)

    def log_epoch(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row, skip=("epoch",)).items():
            self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
        self.writer.flush()

    def log_final(self, final: dict[str, Any], step: int) -> None:
        for key, value in scalars(final, skip=("epochs", "seed")).items():
            self.writer.add_scalar(f"final/{key}", value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run (``WANDB_MODE=offline`` works without an account; files under ``RUN/wandb``
    unless ``WANDB_DIR`` is set)."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, project: str, run_id: str | None) -> None:
        import wandb

        kwargs: dict[str, Any] = {"project": project, "name": run_name}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run_dir)
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        self.run = wandb.init(**kwargs)

    @property
    def run_id(self) -> str | None:
        return str(self.run.id)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row, skip=("epoch",)), step=int(row["epoch"]))

    def log_final(self, final: dict[str, Any], step: int) -> None:
        values = scalars(final, skip=("epochs", "seed"))
        self.run.summary.update({f"final/{k}": v for k, v in values.items()})

    def close(self, status: str) -> None:
        import wandb

        self.run.finish(exit_code=0 if status == "finished" else 1)
        if wandb.run is None:  # no other run of this process: wait until W&B has written all
            wandb.teardown()


class MlflowTracker(Tracker):
    """An MLflow run in experiment ``run.project`` at the client's tracking URI
    (``MLFLOW_TRACKING_URI``)."""

    name = "mlflow"
    #: MLflow's limits per log_batch call and per parameter value
    MAX_METRICS, MAX_PARAMS, MAX_VALUE = 1000, 100, 6000

    def __init__(self, run_dir: Path, run_name: str, project: str, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if run_id:
            self._run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self._run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(project)
            experiment = found.experiment_id if found else self.client.create_experiment(project)
            run = self.client.create_run(experiment, run_name=run_name)
            self._run_id = run.info.run_id

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        known = self.client.get_run(self._run_id).data.params  # params cannot change
        params = [
            Param(key, str(value)[: self.MAX_VALUE])
            for key, value in flatten(config).items()
            if key not in known
        ]
        for i in range(0, len(params), self.MAX_PARAMS):
            self.client.log_batch(self._run_id, params=params[i : i + self.MAX_PARAMS])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(metrics), self.MAX_METRICS):
            self.client.log_batch(self._run_id, metrics=metrics[i : i + self.MAX_METRICS])

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._metrics(scalars(row, skip=("epoch",)), int(row["epoch"]))

    def log_final(self, final: dict[str, Any], step: int) -> None:
        values = scalars(final, skip=("epochs", "seed"))
        self._metrics({f"final/{k}": v for k, v in values.items()}, step)

    def close(self, status: str) -> None:
        state = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self.client.set_terminated(self._run_id, status=state)


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


class Trackers:
    """The trackers of one run, called by the trainer at four points: config, each epoch's
    row, final metrics, close. A tracker that raises is dropped with one warning."""

    def __init__(self, trackers: list[Tracker], warn: Callable[[str], None]) -> None:
        self.trackers = trackers
        self.warn = warn

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _call(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker must never stop training
                self.trackers.remove(tracker)
                self.warn(
                    f"warning: {tracker.name} logging failed ({_one_line(exc)}); it is off for "
                    "the rest of this run (metrics.csv has every row)"
                )
                if method != "close":
                    self._close_quietly(tracker, "failed")

    @staticmethod
    def _close_quietly(tracker: Tracker, status: str) -> None:
        with contextlib.suppress(Exception):
            tracker.close(status)

    def log_config(self, config: dict[str, Any]) -> None:
        self._call("log_config", config)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._call("log_epoch", row)

    def log_final(self, final: dict[str, Any], step: int) -> None:
        self._call("log_final", final, step)

    def close(self, status: str) -> None:
        self._call("close", status)
        self.trackers = []


def open_trackers(
    names: Iterable[str],
    run_dir: Path,
    *,
    run_name: str,
    project: str,
    resume: bool,
    warn: Callable[[str], None],
) -> Trackers:
    """Start the trackers ``names`` (csv needs none) for the run in ``run_dir``; one that
    cannot start is skipped with a warning. With ``resume`` the runs recorded in
    ``RUN/trackers.json`` are continued."""
    ids_path = Path(run_dir) / IDS_FILE
    ids: dict[str, str] = {}
    if resume and ids_path.is_file():
        try:
            ids = dict(json.loads(ids_path.read_text()))
        except (OSError, ValueError, TypeError):
            ids = {}
    opened: list[Tracker] = []
    for name in names:
        cls = TRACKERS.get(name)
        if cls is None:
            continue  # csv: the run directory writes it
        try:
            opened.append(cls(run_dir, run_name=run_name, project=project, run_id=ids.get(name)))
        except Exception as exc:  # no server, no login, bad URI: training goes on
            hint = ""
            if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
                hint = "; set MLFLOW_TRACKING_URI to your tracking server or store"
            warn(
                f"warning: {name} logging could not start ({_one_line(exc)}){hint}; training "
                "goes on without it (metrics.csv has every row)"
            )
    recorded = {t.name: t.run_id for t in opened if t.run_id}
    if recorded and recorded != ids:
        with contextlib.suppress(OSError):
            atomic_write_text(ids_path, json.dumps({**ids, **recorded}, indent=2) + "\n")
    return Trackers(opened, warn)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300]
