"""Typed experiment configs: YAML files, dotted ``--set`` overrides and validation.

A config has five sections, each a dataclass below: ``run``, ``data``, ``model``, ``train`` and
``method``. The ``method`` section holds ``name`` plus that method's own hyper-parameters, which
the method validates against its ``Params`` dataclass (a method owns its defaults). Every unknown
key or ill-typed value raises :class:`~selfkd.errors.ConfigError` with a one-line message that
names the key and the close matches (the generic checks are :mod:`selfkd.schema`'s; ``data.mix``
is parsed once into :attr:`DataConfig.mix_spec`, :mod:`selfkd.mixspec`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfkd.errors import ConfigError
from selfkd.mixspec import MixSpec, parse_mix
from selfkd.registry import close_matches
from selfkd.schema import build_dataclass as _build_dataclass


@dataclass
class RunConfig:
    """Where and how a run executes."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    deterministic: bool = False
    amp: str = "off"  # off | bf16 (CPU: a warning where it is emulated) | fp16 (CUDA only)
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)
    threads: int | None = None  # CPU threads for torch (None = torch's default)
    progress: str = "auto"  # auto (bar on a terminal, off in CI) | bar | off
    tensorboard: bool = False  # the same as listing tensorboard in run.loggers
    #: experiment trackers (selfkd.engine.loggers): csv (always on), tensorboard, wandb, mlflow
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    #: W&B project / MLflow experiment name (other settings: the clients' own WANDB_* and
    #: MLFLOW_* environment variables)
    project: str = "selfkd"
    #: without a progress bar, log a line every N training steps (0 = only one line per epoch)
    log_every: int = 0
    best_metric: str = "top1_err"
    eval_every: int = 1
    #: stop | skip: what a NaN/Inf loss does. skip drops such steps (at most max_skipped_steps);
    #: it cannot undo weights that a step with a finite loss blew up (that run stops anyway)
    nonfinite: str = "stop"
    max_skipped_steps: int = 20
    # steps between host checks of the device-side non-finite record (and, under DDP, of stop
    # signals); 1 = every step. A stop signal is acted on at the next check.
    check_every: int = 20


@dataclass
class DataConfig:
    """Dataset, subset, loaders and augmentation (see `selfkd list` for datasets)."""

    name: str = "synthetic"
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 512
    per_class: int | None = None
    val_size: float = 0
    split_seed: int = 0
    workers: int = 0
    drop_last: bool = False
    #: skip (and count) image files that cannot be decoded instead of stopping (file datasets)
    skip_corrupt: bool = False
    #: download the dataset when it is absent (selfkd.data.download; `selfkd data get NAME`)
    download: bool = False
    augment: dict[str, Any] = field(default_factory=dict)
    normalize: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: mixing augmentation {name: cutout|mixup|cutmix, ...} (selfkd.data.mixing); empty = off
    mix: dict[str, Any] = field(default_factory=dict)

    @property
    def mix_spec(self) -> MixSpec | None:
        """``mix`` parsed and checked (:func:`selfkd.mixspec.parse_mix`); None = no mixing.

        Parsed once when the config is validated and kept with the section it came from (a
        changed ``mix`` is parsed again)."""
        cached = self.__dict__.get("_mix_parsed")
        if cached is None or cached[0] != self.mix:
            cached = (copy.deepcopy(self.mix), parse_mix(self.mix))
            self.__dict__["_mix_parsed"] = cached
        return cached[1]


@dataclass
class ModelConfig:
    """Architecture from the model registry plus its options."""

    name: str = "resnet8"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimizer and schedule (AI-KD paper §4.2 protocol by default)."""

    epochs: int = 300
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [150, 225])
    gamma: float = 0.1
    warmup_epochs: float = 0
    grad_clip: float | None = None


#: the section a run's config.yaml records its environment in (versions, git commit, host,
#: devices, world size; selfkd.engine.runinfo); read back as information, ignored as a setting
META = "meta"
#: the experiment trackers run.loggers may name (selfkd.engine.loggers)
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")

SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "run.device": (),  # free-form, checked when the device is resolved
    "run.amp": ("off", "bf16", "fp16"),
    "run.progress": ("auto", "bar", "off"),
    "run.nonfinite": ("stop", "skip"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("multistep", "cosine", "constant"),
}


@dataclass
class Config:
    """A whole experiment. ``method`` is a plain dict: ``{"name": ..., **hyper-parameters}``."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "ce"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def copy(self) -> Config:
        return copy.deepcopy(self)


def _convert(full: str, value: Any) -> Any:
    """Config-specific spellings: YAML 1.1's bare ``off``/``on`` booleans for choices that
    include ``off``, and ``--set run.loggers=wandb`` (one name for the list)."""
    choices = CHOICES.get(full)
    if isinstance(value, bool) and choices and "off" in choices:
        value = "off" if not value else {"run.progress": "bar"}.get(full, value)
    if full == "run.loggers" and isinstance(value, str):
        value = [value]
    return value


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """:func:`selfkd.schema.build_dataclass` with the config's choices and spellings."""
    return _build_dataclass(cls, data, prefix, choices=CHOICES, convert=_convert)


def validate_values(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (cfg.train.lr > 0, "train.lr must be positive"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (0 <= cfg.train.momentum < 1, "train.momentum must be in [0, 1)"),
        (cfg.train.gamma > 0, "train.gamma must be positive"),
        (cfg.train.warmup_epochs >= 0, "train.warmup_epochs must be >= 0"),
        (cfg.train.grad_clip is None or cfg.train.grad_clip > 0, "train.grad_clip must be > 0"),
        (cfg.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be at least 1"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.data.per_class is None or cfg.data.per_class >= 1, "data.per_class must be >= 1"),
        (cfg.data.val_size >= 0, "data.val_size must be >= 0 (a count or a fraction)"),
        (cfg.run.eval_every >= 1, "run.eval_every must be at least 1"),
        (cfg.run.check_every >= 1, "run.check_every must be at least 1"),
        (cfg.run.log_every >= 0, "run.log_every must be >= 0 (0 = one line per epoch)"),
        (cfg.run.threads is None or cfg.run.threads >= 1, "run.threads must be at least 1"),
        (bool(cfg.run.name.strip()), "run.name must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.train.schedule == "multistep" and sorted(cfg.train.milestones) != cfg.train.milestones:
        raise ConfigError("train.milestones must be increasing, e.g. [150, 225]")
    for name in cfg.run.loggers:
        if name not in LOGGERS:
            raise ConfigError(
                f"run.loggers: unknown logger {name!r}{close_matches(str(name), list(LOGGERS))}; "
                f"choose from {', '.join(LOGGERS)}"
            )
    if "/" in cfg.run.name or cfg.run.name in (".", ".."):
        raise ConfigError(f"run.name {cfg.run.name!r} must be a plain name, not a path")
    _validate_run(cfg.run)
    _ = cfg.data.mix_spec  # data.mix parsed once, here: unknown keys and values fail
    method = cfg.method
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise ConfigError("method must be a mapping with a 'name', e.g. method: {name: ce}")


#: the largest run.seed: NumPy, Python and torch all take it (torch.manual_seed stops at 2**64)
MAX_SEED = 2**63 - 1
#: file systems limit one name (a path component) to 255 bytes
MAX_NAME_BYTES = 255


def _validate_run(run: RunConfig) -> None:
    """Checks of ``run.*`` values that would otherwise fail only once training has started."""
    if not 0 <= run.seed <= MAX_SEED:
        raise ConfigError(f"run.seed must be an integer in [0, 2**63 - 1], got {run.seed!r}")
    size = len(run.name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise ConfigError(
            f"run.name is {size} bytes long but a file name can have at most "
            f"{MAX_NAME_BYTES}; choose a shorter run.name"
        )
    if "\0" in run.name or "\0" in run.out_dir:
        raise ConfigError("run.name and run.out_dir must not contain a NUL character")
    from selfkd.metrics import LOWER_IS_BETTER

    # per-epoch evaluation has no temperature scaling: the *_ts metrics exist in final.json only
    metrics = [k for k in LOWER_IS_BETTER if not k.endswith("_ts")]
    if run.best_metric not in metrics:
        raise ConfigError(
            f"run.best_metric {run.best_metric!r} is not a per-epoch metric"
            f"{close_matches(run.best_metric, metrics)}; choose one of {', '.join(metrics)}"
        )
    if run.max_skipped_steps < 0:
        raise ConfigError("run.max_skipped_steps must be >= 0")


def config_from_dict(data: Any) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (as read from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"a config must be a mapping with sections run/data/model/train/method, "
            f"got {type(data).__name__}"
        )
    sections = [*SECTIONS, "method"]
    for key in data:
        if key not in sections and key != META:
            raise ConfigError(
                f"unknown config section {key!r}{close_matches(str(key), sections)}; "
                f"valid sections: {', '.join(sections)}"
            )
    kwargs: dict[str, Any] = {
        name: build_dataclass(cls, data.get(name), name) for name, cls in SECTIONS.items()
    }
    method = data.get("method", {"name": "ce"})
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict):
        raise ConfigError(f"method must be a mapping with a 'name', got {method!r}")
    kwargs["method"] = dict(method)
    cfg = Config(**kwargs)
    validate_values(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.sub=value`` (value read as YAML) into (["key", "sub"], value)."""
    if "=" not in text:
        raise ConfigError(f"--set takes key=value (e.g. train.lr=0.05), got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set key {key!r} is malformed; use dotted keys like train.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # keep it as a string; type checking reports if that is wrong
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(data, parts, value, f"--set {text}")
    return data


def set_dotted(data: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    """``data[parts[0]]...[parts[-1]] = value``, creating missing sections; a ConfigError
    starting with ``where`` when a part on the way holds a value instead of a section."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part} is not a section (it is {child!r})")
        node = child
    node[parts[-1]] = value


def load_yaml_file(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file; ConfigError (naming ``what`` and the line) if missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping; ``base: other.yaml`` (relative to this file) is merged underneath.

    A chain of ``base:`` files that comes back to a file already on it (a -> b -> a, or a file
    basing on itself) is a ConfigError naming the cycle."""
    path = Path(path)
    here = path.resolve()
    resolved = [p.resolve() for p in _chain]
    if here in resolved:
        shown = [os.path.normpath(p) for p in [*_chain[resolved.index(here) :], path]]
        raise ConfigError(
            f"config {_chain[0]}: its base: files form a cycle ({' -> '.join(shown)}); "
            "remove or change one of these base: lines"
        )
    _chain = (*_chain, path)
    data = load_yaml_file(path, "config")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, not {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a file name, got {base!r}")
        data = merge(read_yaml(path.parent / base, _chain), data)
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "method":
            out[key] = merge(out[key], value)
        elif key == "method" and isinstance(value, dict) and isinstance(out.get(key), dict):
            # a different method replaces the section; the same method merges its parameters
            same = value.get("name", out[key].get("name")) == out[key].get("name")
            out[key] = merge(out[key], value) if same else copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when ``path`` is None) and apply ``--set`` overrides.

    ``path`` is a file or the name of a shipped config (``fashion_mnist/ce``; selfkd.shipped).
    """
    if path is not None:
        from selfkd.shipped import is_sweep, resolve_config

        given, path = path, resolve_config(path)
        if is_sweep(load_yaml_file(path, "config")):
            raise ConfigError(
                f"{given} is a sweep file (it has grid: or runs:), not a config; run it with "
                f"`selfkd sweep {given}`"
            )
    data = read_yaml(path) if path is not None else {}
    if path is not None and not data:
        raise ConfigError(
            f"config {path} is empty; give at least a method and a dataset "
            "(start from one of configs/methods/*.yaml)"
        )
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
