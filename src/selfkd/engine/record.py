"""Where a run's results go: the run directory's metrics rows and ``final.json``, the
experiment trackers (``run.loggers``) and the log lines that frame the run. Only rank 0 writes
files and starts trackers; every rank's log lines go to its log (the others' log is silent)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from selfkd.engine import checkpoint as ckpt
from selfkd.engine import loggers as L
from selfkd.engine.console import epoch_line
from selfkd.engine.device import peak_memory_mb
from selfkd.engine.rundir import RunDir


class RunRecord:
    """The record of one run, called by the trainer at its start, after every epoch, at the
    end (finished, failed or interrupted) and when it closes."""

    def __init__(
        self, run: RunDir, log: logging.Logger, logger_names: list[str], is_main: bool
    ) -> None:
        self.run, self.log, self.is_main = run, log, is_main
        #: run.loggers (csv first; csv is the run directory's own metrics files)
        self.logger_names = logger_names
        #: experiment trackers (rank 0), started by :meth:`start`; see selfkd.engine.loggers
        self.trackers = L.Trackers([], log.info)

    def start(self, cfg: Any, resolved: dict[str, Any], resume: bool) -> None:
        """Start run.loggers' trackers (rank 0) and give them the resolved config."""
        if not self.is_main or len(self.logger_names) == 1:
            return  # csv only: the run directory writes it
        self.trackers = L.open_trackers(
            self.logger_names,
            self.run.path,
            run_name=cfg.run.name,
            project=cfg.run.project,
            resume=resume,
            warn=self.log.info,
        )
        self.trackers.log_config(resolved)

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        """An epoch's row: metrics.csv/.jsonl and the trackers (rank 0), and the log line."""
        if self.is_main:
            self.run.append_row(row)
            self.trackers.log_epoch(row)
        self.log.info(epoch_line(row, epochs))

    def finished(
        self,
        cfg: Any,
        method: str,
        test: dict[str, Any],
        temperature: float | None,
        progress: Any,
        *,
        parameters: int,
        device: torch.device,
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        """final.json and the trackers' final metrics (rank 0), and the closing line; returns
        the final record. ``test``: the final test metrics; ``meta``: the run's metadata."""
        final: dict[str, Any] = {
            "status": "finished",
            "run": str(self.run.path),
            "method": method,
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "seed": cfg.run.seed,
            "epochs": cfg.train.epochs,
            **{f"test_{k}": v for k, v in test.items()},
            "best_epoch": progress.best_epoch,
            "best_metric": cfg.run.best_metric,
            "best_value": progress.best_value,
            "parameters": parameters,
            "train_seconds": progress.train_seconds,
            "sec_per_iter": progress.train_seconds / max(1, progress.global_step),
            "peak_memory_mb": peak_memory_mb(device),
            "skipped_steps": progress.skipped_steps,
            "device": str(device),
            **meta,
            **ckpt.versions(),
        }
        if self.is_main:
            self.run.write_final(final)
            self.trackers.log_final(final, cfg.train.epochs)
        self.log.info(
            f"finished: test top-1 error {test['top1_err']:.2f}%, NLL {test['nll']:.4f}, "
            f"ECE {test['ece']:.2f}%"
            + (
                f", after temperature scaling (T={temperature:.3f}) ECE {test['ece_ts']:.2f}%"
                if temperature is not None
                else ""
            )
        )
        return final

    def failed(self, exc: BaseException, facts: dict[str, Any]) -> None:
        """Mark the run as failed in final.json (rank 0); resuming it is still possible."""
        if self.is_main:
            self.run.write_failure(exc, facts)

    def close(self, status: str) -> None:
        """Close the trackers with the run's status (finished, failed or interrupted)."""
        self.trackers.close(status)
