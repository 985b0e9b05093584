"""Sweeps: many runs from one YAML file, expanded, validated, then trained in order.

A sweep file names a base config, a run-name template, an output folder and the runs::

    base: ../base/cifar100.yaml                 # a config, relative to this file
    name: "{dataset}-{model}-{method}-s{seed}"  # run.name template
    out_dir: runs/paper/aikd-cifar100           # run.out_dir of every run (relative to the cwd)
    grid:                                       # cartesian product over dotted config keys
      method: [ce, cskd, {name: aikd, ablation: no_adv}]
      run.seed: [0, 1, 2]
    set: {train.epochs: 300}                    # fixed overrides of every run
    runs:                                       # explicit override sets, crossed with the grid
      - {method.alpha_g: 0.2, method.alpha_p: 0.2}
      - {method.omega: 0.1, run.name: "{dataset}-{model}-aikd-s{seed}"}

Every run is ``base`` ⊕ ``config`` (an optional inline mapping) ⊕ ``set`` ⊕ one ``runs`` entry
⊕ one grid point ⊕ the command line's ``--set`` (later wins). The plan is the product of the
``runs`` entries (one empty entry when there are none) with the grid points (last grid key
varies fastest). Keys are dotted config keys; a value replaces what is there, except for
``method``: a string ``aikd`` means ``{name: aikd}``, and a mapping with the current method's
name (or without a name) merges into its parameters while another name replaces the section.

Run names come from the ``name`` template, or from a ``run.name`` set by an entry (itself a
template). Fields: ``{method}`` (the method's name, plus ``-<ablation>`` when one is set),
``{seed}``, ``{dataset}``, ``{model}``, the last component of every key the run's entry sets
(``{omega}`` for ``method.omega``) and the same key with dots as underscores
(``{method_omega}``), and the method's parameters as given (``{ablation}``). Mappings format as
their ``name`` (``{mix}`` → ``cutmix``), empty ones and None as ``none``.

Everything is expanded and validated before anything runs: an unknown key or value in any
entry is a :class:`~selfkd.errors.ConfigError` naming the entry and the key, and two entries
expanding to the same run directory are an error too. Datasets are not loaded, so a dataset
name is only checked when a run builds its data.

Running: finished runs (``final.json`` with status finished) are skipped, interrupted ones
(``checkpoints/last.pt`` present) are resumed, new ones trained. A run that fails is reported
and the sweep goes on; Ctrl-C or SIGTERM stops the sweep (rerun the same command to
continue). A per-run lock file lets several ``selfkd sweep`` processes share one sweep (a run
locked by another process is skipped as ``busy``).

Failed runs are recorded: a run can fail before its folder exists (an unknown dataset, a
failing phase 1), so each failure is also written to ``<out_dir>/sweep-failures.json`` (the run's
name, entry, error line and resolved config; under a lock, written atomically), and removed
from it once the run finishes. ``selfkd report`` lists such runs as failed.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import json
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfkd.config import (
    Config,
    config_from_dict,
    load_yaml_file,
    merge,
    parse_override,
    read_yaml,
    set_dotted,
)
from selfkd.engine.rundir import RunDir
from selfkd.errors import ConfigError, RunInterrupted, SelfKDError
from selfkd.locks import exclusive_lock
from selfkd.registry import close_matches

SWEEP_KEYS = ("base", "config", "name", "out_dir", "grid", "set", "runs", "description")
DEFAULT_NAME = "{dataset}-{model}-{method}-s{seed}"
STATUSES = ("finished", "partial", "new")
#: the file in each run.out_dir that lists the sweep's failed runs (see the module docstring)
SWEEP_RECORD = "sweep-failures.json"


@dataclass
class SweepRun:
    """One planned run: where it came from, its overrides and its validated config."""

    index: int
    entry: str  # e.g. "runs[2] + grid (method=aikd, run.seed=0)"
    overrides: dict[str, Any]
    config: Config

    @property
    def name(self) -> str:
        return self.config.run.name

    @property
    def path(self) -> Path:
        return Path(self.config.run.out_dir) / self.config.run.name

    def status(self) -> str:
        """``finished`` (final.json says so), ``partial`` (a checkpoint present) or ``new``."""
        run = RunDir(self.path)
        if run.is_finished():
            return "finished"
        if run.has_checkpoint():
            return "partial"
        return "new"


@dataclass
class Sweep:
    path: Path
    runs: list[SweepRun]


@dataclass
class SweepResult:
    trained: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run name, error line)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = (
            f"sweep: {len(self.trained)} trained, {len(self.resumed)} resumed, "
            f"{len(self.skipped)} skipped (finished), {len(self.failed)} failed"
        )
        if self.busy:
            text += f", {len(self.busy)} busy (locked by another process)"
        for name, error in self.failed:
            text += f"\n  failed: {name}: {error}"
        return text


# --- expansion --------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def format_overrides(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={_describe(v)}" for k, v in overrides.items())


def _check_key(key: Any, where: str) -> list[str]:
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"{where}: keys must be dotted config keys like train.lr, got {key!r}")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"{where}: key {key!r} is malformed; use dotted keys like train.lr")
    return parts


def _as_method(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict):
        return copy.deepcopy(value)
    raise ConfigError(
        f"{where}: method must be a name (aikd) or a mapping ({{name: aikd, ablation: no_adv}}), "
        f"got {value!r}"
    )


def set_key(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set dotted ``key`` in the nested config mapping ``data`` (see the module docstring)."""
    parts = _check_key(key, where)
    if parts[0] == "method":
        current = data.get("method", {"name": "ce"})
        current = _as_method(current, where)
        if len(parts) == 1:
            new = _as_method(value, where)
            if "name" in new and new["name"] != current.get("name"):
                data["method"] = new
            else:
                data["method"] = merge(current, new)
            return
        data["method"] = current
    set_dotted(data, parts, copy.deepcopy(value), f"{where}: {key}")


def _field_value(value: Any) -> Any:
    if isinstance(value, dict):
        return str(value.get("name") or "none") if value else "none"
    if isinstance(value, (list, tuple)):
        return "-".join(str(_field_value(v)) for v in value) or "none"
    if value is None:
        return "none"
    if isinstance(value, str):
        return value.replace("/", "-")  # timm/resnet50 -> timm-resnet50: run names are not paths
    return value


def method_label(method: dict[str, Any]) -> str:
    """``aikd``, or ``aikd-no_adv`` when an ablation is set."""
    name = str(method.get("name", "?"))
    ablation = method.get("ablation")
    return f"{name}-{ablation}" if ablation not in (None, "", "none") else name


def template_fields(cfg: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in cfg.method.items():
        if key != "name":
            fields[key] = _field_value(value)
    for key, value in overrides.items():
        fields[key.split(".")[-1]] = _field_value(value)
        fields[key.replace(".", "_")] = _field_value(value)
    fields.update(
        method=method_label(cfg.method),
        seed=cfg.run.seed,
        dataset=cfg.data.name,
        model=_field_value(cfg.model.name),
    )
    return fields


def render_name(template: Any, fields: dict[str, Any], where: str) -> str:
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{where}: the run name template must be a non-empty string")
    used = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    for name in used:
        root = name.split(".")[0].split("[")[0]
        if root not in fields:
            raise ConfigError(
                f"{where}: unknown field {{{name}}} in run name template {template!r}"
                f"{close_matches(root, list(fields))}; available: {', '.join(sorted(fields))}"
            )
    try:
        return template.format(**fields)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{where}: cannot format run name {template!r}: {exc}") from None


def validate_run(cfg: Config) -> None:
    """Checks beyond :func:`config_from_dict` that need no data: method parameters, model."""
    from selfkd.methods import METHODS
    from selfkd.methods.base import parse_params
    from selfkd.models import MODELS

    method_cls = METHODS.get(cfg.method["name"])
    parse_params(method_cls, {k: v for k, v in cfg.method.items() if k != "name"})
    MODELS.canonical(cfg.model.name)


def _grid_points(grid: Any, where: str) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: grid must be a mapping of dotted keys to lists of values")
    axes = []
    for key, values in grid.items():
        _check_key(key, f"{where}: grid")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: grid.{key} must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: grid.{key} has no values")
        axes.append([(key, v) for v in values])
    return [dict(point) for point in itertools.product(*axes)]


def _ordered(overrides: dict[str, Any]) -> list[tuple[str, Any]]:
    """Shorter keys first (``method`` before ``method.ablation``), otherwise as written."""
    return sorted(overrides.items(), key=lambda kv: len(str(kv[0]).split(".")))


def expand(
    spec: dict[str, Any], base_dir: Path, cli_set: list[str] | None = None, label: str = "sweep"
) -> list[SweepRun]:
    """Expand a sweep mapping into validated runs (see the module docstring)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{label} must be a mapping with base/name/out_dir/grid/set/runs")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(
                f"{label}: unknown sweep key {key!r}{close_matches(str(key), list(SWEEP_KEYS))}; "
                f"valid keys: {', '.join(SWEEP_KEYS)}"
            )
    data: dict[str, Any] = {}
    if spec.get("base") is not None:
        if not isinstance(spec["base"], str):
            raise ConfigError(f"{label}: base must be a config file name, got {spec['base']!r}")
        data = read_yaml(base_dir / spec["base"])
    inline = spec.get("config")
    if inline is not None:
        if not isinstance(inline, dict):
            raise ConfigError(f"{label}: config must be a mapping of config sections")
        data = merge(data, inline)
    fixed = spec.get("set") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{label}: set must be a mapping of dotted keys to values")
    for key, value in _ordered(fixed):
        set_key(data, key, value, f"{label}: set")
    if spec.get("out_dir") is not None:
        if not isinstance(spec["out_dir"], str):
            raise ConfigError(f"{label}: out_dir must be a folder name")
        set_key(data, "run.out_dir", spec["out_dir"], label)
    template = spec.get("name", DEFAULT_NAME)
    cli = [parse_override(text) for text in cli_set or []]

    entries = spec.get("runs")
    if entries is None:
        entries = [{}]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{label}: runs must be a non-empty list of override mappings")
    points = _grid_points(spec.get("grid"), label)

    planned: list[SweepRun] = []
    seen: dict[Path, str] = {}
    for r, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{label}: runs[{r}] must be a mapping of dotted keys to values")
        for point in points:
            overrides = {**entry, **point}
            where_parts = []
            if spec.get("runs") is not None:
                where_parts.append(f"runs[{r}]")
            if point:
                where_parts.append(f"grid ({format_overrides(point)})")
            entry_name = f"entry {len(planned) + 1} " + " + ".join(where_parts or ["(base)"])
            where = f"{label}: {entry_name}"
            run_data = copy.deepcopy(data)
            name_template = template
            for key, value in _ordered(overrides):
                if key == "run.name":
                    name_template = value
                    continue
                set_key(run_data, key, value, where)
            for parts, value in cli:
                key = ".".join(parts)
                if key == "run.name":
                    name_template = value
                    continue
                set_key(run_data, key, value, f"{where} (--set {key})")
            try:
                set_key(run_data, "run.name", "pending", where)
                cfg = config_from_dict(run_data)
                fields = template_fields(cfg, overrides)
                name = render_name(name_template, fields, where)
                set_key(run_data, "run.name", name, where)
                cfg = config_from_dict(run_data)
                validate_run(cfg)
            except ConfigError as exc:
                message = str(exc)
                if not message.startswith(label):
                    message = f"{where}: {message}"
                raise ConfigError(message) from None
            run = SweepRun(len(planned) + 1, entry_name, overrides, cfg)
            other = seen.get(run.path)
            if other is not None:
                raise ConfigError(
                    f"{label}: two entries expand to the same run {run.path}: {other} and "
                    f"{entry_name}; add a field such as {{seed}} or {{method}} to the name template"
                )
            seen[run.path] = entry_name
            planned.append(run)
    return planned


def load_sweep(
    path: str | Path, cli_set: list[str] | None = None, only: str | None = None
) -> Sweep:
    """Read, expand and validate a sweep file (or a shipped one by name, selfkd.shipped);
    ``only`` keeps runs whose name matches."""
    from selfkd.shipped import resolve_config

    path = resolve_config(path, "sweep")
    spec = load_yaml_file(path, "sweep")
    runs = expand(spec or {}, path.parent, cli_set, label=f"sweep {path}")
    if only:
        runs = [r for r in runs if matches(r.name, only)]
        if not runs:
            raise ConfigError(f"sweep {path}: no run name matches --only {only!r}")
    return Sweep(path, runs)


def matches(name: str, pattern: str) -> bool:
    """Glob match (``*aikd*s0``) when the pattern has wildcards, else a substring match."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def plan_table(runs: list[SweepRun]) -> str:
    """One line per run: index, status, run directory, overrides."""
    if not runs:
        return "(empty plan)"
    width = max(len(str(r.path)) for r in runs)
    lines = []
    for r in runs:
        path = str(r.path)
        lines.append(
            f"{r.index:>4}  {r.status():<8}  {path:<{width}}  {format_overrides(r.overrides)}"
        )
    counts = {s: sum(r.status() == s for r in runs) for s in STATUSES}
    lines.append(
        f"{len(runs)} runs: {counts['finished']} finished, {counts['partial']} partial "
        f"(to resume), {counts['new']} new"
    )
    return "\n".join(lines)


# --- running ----------------------------------------------------------------------------------
@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[bool]:
    """A non-blocking exclusive lock ``<run>.lock`` beside the run; yields False if taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            yield True
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _record_lock(record: Path) -> Iterator[None]:
    """A blocking exclusive lock beside ``record`` (several sweep processes share it)."""
    with exclusive_lock(record.parent / f".{record.name}.lock"):
        yield


def read_failures(record: Path) -> dict[str, dict[str, Any]]:
    """The failed runs a sweep record lists, by run name ({} when there is no record);
    ValueError saying what is wrong when it cannot be read."""
    record = Path(record)
    try:
        data = json.loads(record.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"sweep record is corrupt (not valid JSON: {exc.msg} at line {exc.lineno})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"sweep record cannot be read ({exc})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, dict):
        raise ValueError("sweep record has no 'runs' mapping")
    return {str(name): entry for name, entry in runs.items() if isinstance(entry, dict)}


def update_failures(out_dir: Path, name: str, entry: dict[str, Any] | None) -> None:
    """Record run ``name`` as failed (``entry``) or drop it (None) in ``out_dir``'s record."""
    from selfkd.engine.checkpoint import atomic_write_text

    record = Path(out_dir) / SWEEP_RECORD
    if entry is None and not record.is_file():
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    with _record_lock(record):
        try:
            runs = read_failures(record)
        except ValueError:
            runs = {}  # an unreadable record is replaced by a readable one
        if entry is None:
            if name not in runs:
                return
            runs.pop(name)
        else:
            runs[name] = entry
        text = json.dumps({"runs": runs}, indent=1, sort_keys=True, default=str) + "\n"
        atomic_write_text(record, text)


def _record_outcome(run: SweepRun, error: str | None, log: Callable[[str], Any], head: str) -> None:
    """Write a failure (``error``) or a success (None) of ``run`` to its sweep record."""
    entry = None
    if error is not None:
        entry = {
            "error": error,
            "entry": run.entry,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": run.config.to_dict(),
        }
    try:
        update_failures(run.path.parent, run.name, entry)
    except OSError as exc:
        log(f"{head}: could not update {run.path.parent / SWEEP_RECORD}: {exc}")


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, SelfKDError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_sweep(
    runs: list[SweepRun],
    *,
    quiet: bool = True,
    log: Callable[[str], Any] = print,
    train_fn: Callable[..., dict[str, Any]] | None = None,
    on_run_end: Callable[[SweepRun, str, BaseException | None], Any] | None = None,
    **trainer_kwargs: Any,
) -> SweepResult:
    """Train the runs in order; skip finished ones, resume partial ones, go on after failures.

    ``train_fn`` defaults to :func:`selfkd.engine.runner.train`; ``on_run_end(run, outcome,
    error)`` is called after each run (outcome: trained/resumed/skipped/busy/failed);
    ``trainer_kwargs`` (e.g. ``callbacks``) go to every run's trainer. KeyboardInterrupt stops the
    sweep and propagates, and so does :class:`~selfkd.errors.RunInterrupted` (a signal stopped
    the run after writing a checkpoint).
    """
    if train_fn is None:
        from selfkd.engine.runner import train as train_fn
    result = SweepResult()
    total = len(runs)
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{total}] {run.name}"
        outcome, error = "skipped", None
        with run_lock(run.path) as locked:
            status = run.status()
            if not locked:
                outcome = "busy"
                result.busy.append(run.name)
                log(f"{head}: busy (another process holds {run.path})")
            elif status == "finished":
                result.skipped.append(run.name)
                log(f"{head}: finished, skipped")
                _record_outcome(run, None, log, head)
            else:
                resume = status == "partial"
                fresh = not resume and RunDir(run.path).holds_run()  # started, no epoch saved
                log(f"{head}: {'resuming' if resume else 'training'} ({run.path})")
                try:
                    train_fn(
                        run.config.copy(),
                        resume=resume,
                        overwrite=fresh,
                        quiet=quiet,
                        **trainer_kwargs,
                    )
                except (KeyboardInterrupt, RunInterrupted):
                    log(f"{head}: interrupted; rerun the sweep to resume it")
                    raise
                except Exception as exc:  # a failing run must not stop the sweep
                    outcome, error = "failed", exc
                    result.failed.append((run.name, _error_line(exc)))
                    log(f"{head}: failed: {_error_line(exc)}")
                    _record_outcome(run, _error_line(exc), log, head)
                else:
                    _record_outcome(run, None, log, head)
                    outcome = "resumed" if resume else "trained"
                    (result.resumed if resume else result.trained).append(run.name)
                    final = RunDir(run.path).read_final() or {}
                    err = final.get("test_top1_err")
                    log(
                        f"{head}: done"
                        + (f", test top-1 err {err:.2f}%" if isinstance(err, float) else "")
                    )
        if on_run_end is not None:
            on_run_end(run, outcome, error)
    return result
