"""High-level entry points: train a config end to end, including a method's phase 1.

Methods that learn from a trained model of the same architecture (AI-KD's superior model,
TF-KD-self's teacher) name that parameter in ``Method.teacher_param``. When its value is
``auto``, phase 1 is a plain cross-entropy run with the same data, model, schedule and seed
(or the seed ``Method.teacher_seed`` names, e.g. AI-KD's ``superior_seed``); it
lives in ``<out_dir>/_phase1/<key>``, where ``key`` hashes everything that shapes it, so every
method and every later run with the same setting reuses one finished phase-1 run (an interrupted
one is resumed). The teacher is the phase-1 model after its last epoch (no test-set selection).

Under DDP (torchrun) every rank calls :func:`train`: phase 1 is a DDP run too (all ranks train
it together, rank 0 writes it). Only rank 0 takes the phase-1 lock and decides whether to reuse,
resume or train; the others follow its decision (broadcast), and only rank 0 prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfkd.config import Config, RunConfig
from selfkd.engine import distributed as D
from selfkd.engine.rundir import RunDir, check_resumable
from selfkd.engine.trainer import Trainer
from selfkd.errors import CheckpointError
from selfkd.locks import exclusive_lock
from selfkd.methods import Method, build_method

PHASE1_DIR = "_phase1"


def phase1_config(cfg: Config) -> Config:
    """The plain-CE config whose trained model serves as teacher/superior for ``cfg``."""
    phase1 = cfg.copy()
    phase1.method = {"name": "ce"}
    phase1.run.seed = build_method(cfg.method).teacher_seed(cfg.run.seed)
    key = phase1_key(phase1)
    model = cfg.model.name.replace("/", "-")  # timm/<name>: a run name is not a path
    phase1.run.name = f"{cfg.data.name}-{model}-seed{phase1.run.seed}-{key}"
    phase1.run.out_dir = str(Path(cfg.run.out_dir) / PHASE1_DIR)
    phase1.run.tensorboard = False
    phase1.run.loggers = ["csv"]  # trackers show the runs asked for; phase 1 has its own files
    return phase1


#: config keys added after the first release, with the value that means "as before": a key at
#: that value is left out of the phase-1 key so that phase-1 runs made earlier stay reusable.
#: (Add every new data/model/train key here with its default.)
LATER_KEYS: dict[str, dict[str, Any]] = {
    "data": {"mix": {}, "skip_corrupt": False},
    "model": {},
    "train": {},
}
#: keys that do not change what phase 1 learns
IGNORED_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("workers", "download"),
    "model": (),
    "train": (),
}


#: the run.* keys phase1_key leaves out: phase-1 runs are shared by runs that differ in them,
#: so resuming an interrupted phase 1 may change them too
PHASE1_UNHASHED: frozenset[str] = frozenset(
    f"run.{f.name}"
    for f in dataclasses.fields(RunConfig)
    if f.name not in ("seed", "deterministic", "amp")
) | frozenset(f"{section}.{key}" for section, keys in IGNORED_KEYS.items() for key in keys)


def phase1_key(phase1: Config) -> str:
    """Hash of everything that shapes the phase-1 model (data, model, schedule, seed, ...)."""
    shaping: dict[str, Any] = {
        "data": phase1.to_dict()["data"],
        "model": phase1.to_dict()["model"],
        "train": phase1.to_dict()["train"],
        "seed": phase1.run.seed,
        "deterministic": phase1.run.deterministic,
        "amp": phase1.run.amp,
    }
    for section, later in LATER_KEYS.items():
        for key, neutral in later.items():
            if shaping[section].get(key, neutral) == neutral:
                shaping[section].pop(key, None)
        for key in IGNORED_KEYS[section]:
            shaping[section].pop(key, None)
    blob = json.dumps(shaping, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


@contextlib.contextmanager
def phase1_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (``<path>.lock``) held while a phase-1 run is checked or trained."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path = path.resolve()  # a phase-1 folder reached through a link shares its lock
    with exclusive_lock(path.parent / f"{path.name}.lock"):
        yield


def resolve_teacher(
    cfg: Config, method: Method, *, quiet: bool = False, log: Any = print
) -> str | None:
    """Make sure the method's phase-1 checkpoint exists; return its path (None if unneeded)."""
    param = method.teacher_param
    if param is None or not method.needs_teacher():
        return None
    value = getattr(method.params, param)
    if value != "auto":
        path = Path(value)
        if not path.is_file():
            raise CheckpointError(
                f"method.{param}: checkpoint {path} not found; give the path of a finished "
                f"run's checkpoints/last.pt, or set method.{param}=auto to train it"
            )
        return str(path)
    phase1 = phase1_config(cfg)
    run = RunDir(Path(phase1.run.out_dir) / phase1.run.name)
    D.init_distributed(cfg.run.device)  # phase 1 trains with every rank under torchrun
    main = D.is_main()
    lock = phase1_lock(run.path) if main else contextlib.nullcontext()
    with lock:  # two runs of one setting must not train phase 1 twice
        # rank 0 decides; under DDP the others follow (their view of the files may lag)
        action = None
        if main:
            if run.is_finished() and run.last.is_file():
                action = "reuse"
            else:
                action = "resume" if run.has_checkpoint() else "train"
        action = D.broadcast_object(action)
        if action == "reuse":
            if main:
                log(f"phase 1: reusing the finished plain-CE model in {run.path}")
        else:
            resume = action == "resume"
            verb = "resuming" if resume else "training"
            if main:
                log(f"phase 1: {verb} the plain-CE model in {run.path}")
            Trainer(
                phase1,
                resume=resume,
                overwrite=not resume,
                quiet=quiet,
                resume_may_change=PHASE1_UNHASHED,
            ).fit()
        D.barrier()  # rank 0 has written the phase-1 checkpoint before anyone reads it
    setattr(method.params, param, str(run.last))
    return str(run.last)


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train ``cfg`` (phase 1 first when its method needs it); return the final metrics."""
    method = build_method(cfg.method)
    run = RunDir(Path(cfg.run.out_dir) / cfg.run.name)
    if run.holds_run() and not (resume or overwrite):
        run.prepare(resume=False, overwrite=False)  # raises RunDirError before phase 1 runs
    if resume and not run.has_checkpoint() and not run.holds_run():
        # a run stopped during its phase 1 has no folder of its own yet: --resume finishes
        # phase 1, then trains the method from the start; else there is nothing to resume
        if phase1_pending(cfg, method):
            resume = False
        else:
            check_resumable(run)  # raises CheckpointError before phase 1 runs
    resolve_teacher(cfg, method, quiet=quiet, log=(lambda *_: None) if quiet else print)
    trainer = Trainer(
        cfg, method=method, resume=resume, overwrite=overwrite, quiet=quiet, **trainer_kwargs
    )
    return trainer.fit()


def phase1_pending(cfg: Config, method: Method) -> bool:
    """Does ``cfg`` train its phase 1 automatically, and is that run not finished yet?"""
    param = method.teacher_param
    if param is None or not method.needs_teacher() or getattr(method.params, param) != "auto":
        return False
    phase1 = phase1_config(cfg)
    return not RunDir(Path(phase1.run.out_dir) / phase1.run.name).is_finished()


def phase1_run_dir(cfg: Config) -> Path | None:
    """Where the phase-1 run of ``cfg`` lives when its method trains one automatically."""
    method = build_method(cfg.method)
    if method.teacher_param is None or not method.needs_teacher():
        return None
    value = getattr(method.params, method.teacher_param)
    if value == "auto":
        phase1 = phase1_config(cfg)
        return Path(phase1.run.out_dir) / phase1.run.name
    path = Path(value)
    return path.parent.parent if path.parent.name == "checkpoints" else None
