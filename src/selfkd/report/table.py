"""Tables over runs: group by setting, then by method, and report mean ± std over seeds.

A *setting* is everything in a run's resolved config except the method, the seed and where the
run lives; runs of different settings are never averaged together (each setting gets its own
table). A method's *label* is its name plus every hyper-parameter that differs from the method's
defaults (phase-1 checkpoint paths excluded), e.g. ``aikd (ablation=no_adv)``. Runs that did not
finish are listed as such, never silently dropped: failed and incomplete runs, runs a sweep
recorded as failed before their folder existed (``sweep-failures.json``, see
:mod:`selfkd.sweep`), and folders whose config.yaml or final.json cannot be read (listed as
broken; the other runs are still reported).

A mean is over distinct seeds: two finished runs of one method and setting with the same
``run.seed`` are split by what their records say differs (e.g. ``[world_size=2]``); when nothing
recorded differs, the first by path is used and the report warns which runs were left out.
One seed shows ``± n/a``. With a baseline, each method's paired difference to it on the same
seeds is added (:mod:`selfkd.report.paired`).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfkd.errors import ConfigError, RunDirError
from selfkd.report.paired import PairedDifference, paired_difference

METRICS: list[tuple[str, str, bool]] = [
    # (final.json key without "test_", column title, lower is better)
    ("top1_err", "Top-1 err (%)", True),
    ("top5_err", "Top-5 err (%)", True),
    ("macro_f1", "Macro-F1 (%)", False),
    ("nll", "NLL", True),
    ("ece", "ECE (%)", True),
    ("ece_ts", "ECE+TS (%)", True),
    ("nll_ts", "NLL+TS", True),
    ("aurc", "AURC (x1000)", True),
]
#: the splits a report can show: the test split (final.json) or the validation split (the
#: held-out part of the training set, data.val_size > 0; the last epoch's row of metrics.jsonl)
SPLITS = ("test", "val")
SPLIT_TITLES = {"test": "Test split", "val": "Validation split (held out of the training set)"}
COST: list[tuple[str, str]] = [
    ("sec_per_iter", "s/iter"),
    ("parameters", "params"),
    ("peak_memory_mb", "peak MB"),
]
TEACHER_PARAMS = ("superior", "teacher")
CONFIG_SECTIONS = ("run", "data", "model", "train")
#: run.* keys that say where a run lives or how it logs, not what it computes: never a reason
#: to tell two runs of one seed apart
LOCATION_KEYS = (
    "name",
    "out_dir",
    "seed",
    "progress",
    "tensorboard",
    "loggers",
    "project",
    "log_every",
)
#: data.* keys that cannot change a result: never part of a setting
DATA_NOT_SHAPING = ("download",)
#: how a run ran (config.yaml's ``meta`` section, also in final.json): tells two runs of one
#: seed apart (each value gets its own row), never part of a setting
META_SPLIT_KEYS = ("world_size", "device_name", "device_count")
#: where the code came from: named in the warning about two runs of one seed, not split by
META_PROVENANCE_KEYS = ("selfkd", "git_commit", "host", "torch", "python")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    final: dict[str, Any] | None
    problem: str | None = None  # why the run's final.json cannot be read
    duplicate_of: Path | None = None  # another finished run of the same seed stands for it
    _val_row: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def status(self) -> str:
        if self.problem is not None:
            return "broken"
        if self.duplicate_of is not None:
            return "duplicate"
        if self.final is None:
            return "incomplete"
        return str(self.final.get("status", "unknown"))

    @property
    def seed(self) -> Any:
        return (self.config.get("run") or {}).get("seed")

    def value(self, key: str) -> Any:
        """A final metric: ``test_*`` from final.json; ``val_*`` (never in final.json) from the
        last metrics.jsonl row that evaluated the validation split (the last epoch's)."""
        if key.startswith("val_") and self.status == "finished":
            return self._last_val_row().get(key)
        return (self.final or {}).get(key)

    def _last_val_row(self) -> dict[str, Any]:
        if self._val_row is None:
            self._val_row = {}
            try:
                lines = (self.path / "metrics.jsonl").read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                lines = []
            for line in reversed(lines):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and any(k.startswith("val_") for k in row):
                    self._val_row = row
                    break
        return self._val_row

    def note(self) -> str:
        """One line on why this run is not in the means ('' for a finished run)."""
        status = self.status
        if status == "finished":
            return ""
        if self.problem is not None:
            return f"broken: {self.problem}"
        if self.duplicate_of is not None:
            return f"duplicate of seed {self.seed}: the mean uses {self.duplicate_of}"
        error = (self.final or {}).get("error")
        return f"{status}: {error}" if error else status


@dataclass
class Broken:
    """A folder (or sweep record) that cannot be placed in any table, and why."""

    path: Path
    reason: str


@dataclass
class Scan:
    """What :func:`scan_runs` found: readable runs and the folders it could not read."""

    runs: list[Run]
    broken: list[Broken]


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)
    split: str = "test"  # which split's metrics the tables show: test or val

    def metric(self, name: str) -> list[float]:
        """The finished runs' values of metric ``name`` on this group's split."""
        return self.values(f"{self.split}_{name}")

    def values(self, key: str) -> list[float]:
        out = []
        for run in self.runs:
            value = run.value(key)
            if run.status == "finished" and isinstance(value, (int, float)):
                out.append(float(value))
        return out


def _read_config(path: Path) -> dict[str, Any]:
    """A run folder's config.yaml as a mapping of sections; ValueError saying what is wrong."""
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"config.yaml is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ValueError("config.yaml is not text (not UTF-8)") from None
    except OSError as exc:
        raise ValueError(f"config.yaml cannot be read ({exc.strerror or exc})") from None
    if raw is None:
        raise ValueError("config.yaml is empty")
    if not isinstance(raw, dict):
        raise ValueError(f"config.yaml holds a {type(raw).__name__}, not a mapping of sections")
    for section in CONFIG_SECTIONS:
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise ValueError(f"config.yaml section {section!r} is not a mapping")
    method = raw.get("method")
    if isinstance(method, str):
        raw["method"] = {"name": method}
    elif method is not None and not isinstance(method, dict):
        raise ValueError("config.yaml section 'method' is not a mapping")
    return raw


def _read_final(path: Path) -> dict[str, Any] | None:
    """A run folder's final.json (None when absent); ValueError saying what is wrong."""
    final_path = path / "final.json"
    if not final_path.is_file():
        return None
    try:
        final = json.loads(final_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"final.json is corrupt (not valid JSON: {exc.msg} at line {exc.lineno})"
        ) from None
    except UnicodeDecodeError:
        raise ValueError("final.json is not text (not UTF-8)") from None
    except OSError as exc:
        raise ValueError(f"final.json cannot be read ({exc.strerror or exc})") from None
    if not isinstance(final, dict):
        raise ValueError(f"final.json holds a {type(final).__name__}, not a JSON object")
    return final


def scan_runs(paths: list[str | Path], *, sweep_records: bool = True) -> Scan:
    """Every run under ``paths``: run directories (holding config.yaml, phase-1 runs included)
    and, with ``sweep_records``, the runs sweeps recorded as failed before their folder held a
    config. A folder whose config.yaml cannot be read is listed in ``broken``; one whose
    final.json cannot be read is a run with status ``broken``."""
    from selfkd.sweep import SWEEP_RECORD, read_failures

    runs: list[Run] = []
    broken: list[Broken] = []
    seen: set[Path] = set()
    records: list[Path] = []
    for base in map(Path, paths):
        if not base.exists():
            raise RunDirError(f"{base} does not exist; pass run directories or folders of runs")
        if (base / "config.yaml").is_file():
            candidates = [base]
        else:
            candidates = sorted(p.parent for p in base.rglob("config.yaml"))
            records += sorted(base.rglob(SWEEP_RECORD))
        for path in candidates:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                config = normalized_config(_read_config(path))
            except ValueError as exc:
                broken.append(Broken(path, str(exc)))
                continue
            try:
                final, problem = _read_final(path), None
            except ValueError as exc:
                final, problem = None, str(exc)
            runs.append(Run(path=path, config=config, final=final, problem=problem))
    if sweep_records:
        unique: dict[Path, Path] = {}
        for record in records:
            unique.setdefault(record.resolve(), record)
        for record in unique.values():
            try:
                entries = read_failures(record)
            except ValueError as exc:
                broken.append(Broken(record, str(exc)))
                continue
            for name, entry in sorted(entries.items()):
                path = record.parent / name
                if path.resolve() in seen or (path / "config.yaml").is_file():
                    continue  # the run's own folder describes it
                seen.add(path.resolve())
                config = entry.get("config")
                if not isinstance(config, dict):
                    broken.append(Broken(path, f"{record.name} holds no config for this run"))
                    continue
                error = entry.get("error") or "unknown error"
                final = {"status": "failed", "error": f"{error} (recorded by the sweep)"}
                runs.append(Run(path=path, config=normalized_config(config), final=final))
    if not runs and not broken:
        raise RunDirError(
            f"no run directories (with config.yaml) under {', '.join(map(str, paths))}"
        )
    return Scan(runs, broken)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every readable run directory (one holding config.yaml) under ``paths``."""
    scan = scan_runs(paths, sweep_records=False)
    if not scan.runs:
        first = scan.broken[0]
        raise RunDirError(
            f"no readable run directories under {', '.join(map(str, paths))}: "
            f"{first.path}: {first.reason}"
            + (f" (and {len(scan.broken) - 1} more)" if len(scan.broken) > 1 else "")
        )
    return scan.runs


def normalized_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The config with today's defaults filled in, so runs written before a new config key
    existed group with runs written after (the method section is kept as written)."""
    from selfkd.config import config_from_dict

    try:
        sections = {k: v for k, v in raw.items() if k not in ("method", "meta")}
        full = config_from_dict(sections).to_dict()
    except (ConfigError, TypeError, ValueError, AttributeError):
        return raw
    full["method"] = raw.get("method") or {}
    if "meta" in raw:
        full["meta"] = raw["meta"]
    return full


def setting_key(config: dict[str, Any]) -> str:
    """A readable summary + hash of everything but the method, seed and run location."""
    shaping = {k: v for k, v in config.items() if k not in ("method", "run", "meta")}
    if isinstance(shaping.get("data"), dict):
        shaping["data"] = {k: v for k, v in shaping["data"].items() if k not in DATA_NOT_SHAPING}
    run = {
        k: v
        for k, v in (config.get("run") or {}).items()
        if k in ("deterministic", "amp", "channels_last")
    }
    blob = json.dumps({**shaping, "run": run}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    data, model, train = config.get("data", {}), config.get("model", {}), config.get("train", {})
    options = model.get("options") if isinstance(model.get("options"), dict) else {}
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    subset = f", {data.get('per_class')}/class" if data.get("per_class") else ""
    return (
        f"{data.get('name')}{subset} / {model.get('name')}{f'({opts})' if opts else ''} / "
        f"{train.get('epochs')} epochs [{digest}]"
    )


def method_label(method: dict[str, Any]) -> str:
    """Method name plus its non-default hyper-parameters."""
    from selfkd.methods import method_defaults

    name = method.get("name", "?")
    try:
        defaults = method_defaults(name)
    except ConfigError:
        return str(name)
    diffs = [
        f"{k}={v}"
        for k, v in method.items()
        if k != "name" and k not in TEACHER_PARAMS and defaults.get(k) != v
    ]
    return f"{name} ({', '.join(diffs)})" if diffs else str(name)


def _meta(run: Run, keys: tuple[str, ...]) -> dict[str, str]:
    meta = run.config.get("meta") if isinstance(run.config.get("meta"), dict) else {}
    meta = {**meta, **{k: v for k, v in (run.final or {}).items() if k in keys}}
    return {k: json.dumps(meta[k], default=str) for k in keys if k in meta}


def _variant(run: Run) -> dict[str, str]:
    """What tells two runs of one seed apart: run.* keys (not where the run lives or how it
    logs) and how it ran (world size, devices), each JSON-encoded."""
    out = {
        k: json.dumps(v, sort_keys=True, default=str)
        for k, v in (run.config.get("run") or {}).items()
        if k not in LOCATION_KEYS
    }
    return {**out, **_meta(run, META_SPLIT_KEYS)}


def _differing(runs: list[Run], encode: Callable[[Run], dict[str, str]]) -> list[str]:
    """The keys whose encoded values are not the same for all of ``runs``."""
    codes = [encode(r) for r in runs]
    keys = {k for c in codes for k in c}
    return sorted(k for k in keys if len({c.get(k) for c in codes}) > 1)


def _shown(encoded: str | None) -> str:
    """A value as :func:`_variant` encoded it, for a label (``?`` when not recorded)."""
    if encoded is None:
        return "?"
    value = json.loads(encoded)
    return value if isinstance(value, str) else encoded


def _split_duplicate_seeds(group: Group) -> tuple[list[Group], list[str]]:
    """Groups with at most one finished run per seed, and warnings naming the duplicates.

    A duplicated seed splits the group by the keys whose values differ among that seed's runs
    (label ``ce [world_size=2]``); duplicates that nothing recorded tells apart keep the first
    run by path and mark the others ``duplicate``."""

    def finished_by_seed(runs: list[Run]) -> dict[str, list[Run]]:
        out: dict[str, list[Run]] = {}
        for run in sorted(runs, key=lambda r: str(r.path)):
            if run.status == "finished":
                out.setdefault(json.dumps(run.seed, default=str), []).append(run)
        return {seed: same for seed, same in out.items() if len(same) > 1}

    dups = finished_by_seed(group.runs)
    if not dups:
        return [group], []
    variants = {id(r): _variant(r) for r in group.runs}
    keys = sorted({k for same in dups.values() for k in _differing(same, _variant)})
    parts: dict[tuple[str | None, ...], Group] = {}
    for run in group.runs:
        values = tuple(variants[id(run)].get(k) for k in keys)
        shown = ", ".join(f"{k}={_shown(v)}" for k, v in zip(keys, values, strict=True))
        label = f"{group.label} [{shown}]" if keys else group.label
        parts.setdefault(values, Group(label, split=group.split))
        parts[values].runs.append(run)
    warnings = []
    if keys:
        warnings.append(
            f"{group.label}: runs of the same seed differ in {', '.join(keys)}; "
            "each value is its own row"
        )
    for part in parts.values():
        for seed, same in finished_by_seed(part.runs).items():
            for other in same[1:]:
                other.duplicate_of = same[0].path
            origin = _differing(same, lambda r: _meta(r, META_PROVENANCE_KEYS))
            warnings.append(
                f"{part.label}: seed {json.loads(seed)} has {len(same)} finished runs that "
                f"nothing recorded about the run tells apart"
                + (f" (they differ only in {', '.join(origin)})" if origin else "")
                + f" ({', '.join(str(r.path) for r in same)}); the mean uses {same[0].path} only"
            )
    return list(parts.values()), warnings


def group_runs(
    runs: list[Run], warnings: list[str] | None = None, split: str = "test"
) -> dict[str, list[Group]]:
    """Runs by setting, then by method label, with at most one finished run per seed in a
    group (see :func:`_split_duplicate_seeds`; its warnings are appended to ``warnings``);
    the groups' tables show ``split`` (test, or val: the held-out part of the training set)."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    settings: dict[str, dict[str, Group]] = {}
    for run in runs:
        setting = setting_key(run.config)
        label = method_label(run.config.get("method") or {})
        groups = settings.setdefault(setting, {})
        groups.setdefault(label, Group(label, split=split)).runs.append(run)
    out: dict[str, list[Group]] = {}
    for setting, by_label in sorted(settings.items()):
        split: list[Group] = []
        for group in by_label.values():
            parts, notes = _split_duplicate_seeds(group)
            split += parts
            if warnings is not None:
                warnings += [f"{setting}: {note}" for note in notes]
        out[setting] = sorted(split, key=lambda g: (g.label != "ce", g.label))
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; the std is NaN for one value (no spread to estimate)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _fmt(mean: float, std: float, digits: int) -> str:
    spread = "n/a" if math.isnan(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread}"


def _digits(key: str) -> int:
    return 4 if key.startswith("nll") else 2


def seed_count(group: Group) -> int:
    """Distinct seeds among the group's finished runs."""
    return len({json.dumps(r.seed, default=str) for r in group.runs if r.status == "finished"})


def markdown_table(groups: list[Group]) -> str:
    """One setting's table; best mean in bold, second underlined (finished runs only)."""
    present = [(k, t, low) for k, t, low in METRICS if any(g.metric(k) for g in groups)]
    rank: dict[tuple[str, str], int] = {}
    for key, _, lower in present:
        means = sorted(
            {round(mean_std(g.metric(key))[0], 6) for g in groups if g.metric(key)},
            reverse=not lower,
        )
        for group in groups:
            vals = group.metric(key)
            if vals:
                rank[(group.label, key)] = means.index(round(mean_std(vals)[0], 6))
    lines = [
        "| " + " | ".join(["method", "seeds", *(t for _, t, _ in present)]) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for group in groups:
        other = [r.status for r in group.runs if r.status != "finished"]
        seeds = f"{seed_count(group)}" + (
            f" (+{len(other)} {'/'.join(sorted(set(other)))})" if other else ""
        )
        cells = []
        for key, _, _ in present:
            vals = group.metric(key)
            if not vals:
                cells.append("-")
                continue
            text = _fmt(*mean_std(vals), _digits(key))
            r = rank.get((group.label, key))
            cells.append(f"**{text}**" if r == 0 else f"<u>{text}</u>" if r == 1 else text)
        lines.append("| " + " | ".join([group.label, seeds, *cells]) + " |")
    return "\n".join(lines)


def cost_table(groups: list[Group]) -> str:
    lines = ["| method | " + " | ".join(t for _, t in COST) + " |", "|---|" + "---|" * len(COST)]
    for group in groups:
        cells = []
        for key, _ in COST:
            vals = group.values(key)
            if not vals:
                cells.append("-")
            elif key == "parameters":
                cells.append(f"{int(statistics.fmean(vals)):,}")
            else:
                cells.append(f"{statistics.fmean(vals):.3g}")
        lines.append(f"| {group.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- paired differences to a baseline ---------------------------------------------------------
def _by_seed(group: Group, key: str) -> dict[str, float]:
    out = {}
    for run in group.runs:
        value = run.value(key)
        if run.status == "finished" and isinstance(value, (int, float)):
            out[json.dumps(run.seed, default=str)] = float(value)
    return out


def paired_to_baseline(
    groups: list[Group], baseline: str
) -> dict[str, dict[str, PairedDifference]] | None:
    """``{method label: {metric key: paired difference}}`` of every other group of one setting
    to the group labelled ``baseline`` (None when the setting has no such group); a metric is
    left out when the two share no seed with a finished value of it."""
    base = next((g for g in groups if g.label == baseline), None)
    if base is None:
        return None
    out: dict[str, dict[str, PairedDifference]] = {}
    for group in groups:
        if group is base:
            continue
        cells: dict[str, PairedDifference] = {}
        for key, _, lower in METRICS:
            mine = _by_seed(group, f"{group.split}_{key}")
            theirs = _by_seed(base, f"{base.split}_{key}")
            seeds = sorted(set(mine) & set(theirs))
            if seeds:
                cells[key] = paired_difference(
                    [mine[s] for s in seeds], [theirs[s] for s in seeds], lower_is_better=lower
                )
        out[group.label] = cells
    return out


def _fmt_paired(p: PairedDifference, digits: int) -> str:
    interval = "n/a" if math.isnan(p.low) else f"{p.low:+.{digits}f}, {p.high:+.{digits}f}"
    return f"{p.mean:+.{digits}f} [{interval}] {p.wins}/{p.n}"


def paired_table(groups: list[Group], baseline: str, paired: dict[str, dict]) -> str:
    """The Markdown table of :func:`paired_to_baseline`'s result for one setting."""
    present = [(k, t) for k, t, _ in METRICS if any(k in cells for cells in paired.values())]
    lines = [
        "| " + " | ".join(["method", "paired seeds", *(t for _, t in present)]) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for group in groups:
        if group.label not in paired:
            continue
        cells = paired[group.label]
        n = max((p.n for p in cells.values()), default=0)
        row = [_fmt_paired(cells[k], _digits(k)) if k in cells else "-" for k, _ in present]
        lines.append("| " + " | ".join([group.label, str(n), *row]) + " |")
    return "\n".join(lines)


def _check_baseline(settings: dict[str, list[Group]], baseline: str) -> dict[str, dict]:
    """Paired results per setting; ConfigError when ``baseline`` is no method of the runs or
    no other method shares a finished seed with it."""
    labels = sorted({g.label for groups in settings.values() for g in groups})
    if baseline not in labels:
        raise ConfigError(
            f"--baseline {baseline!r} is not a method of these runs; methods: {', '.join(labels)}"
            " (quote a label with parameters, e.g. --baseline 'aikd (ablation=no_adv)')"
        )
    results = {}
    for setting, groups in settings.items():
        paired = paired_to_baseline(groups, baseline)
        if paired is not None:
            results[setting] = paired
    if not any(cells for paired in results.values() for cells in paired.values()):
        raise ConfigError(
            f"--baseline {baseline!r}: no other method has a finished run with the same "
            f"run.seed as a {baseline} run in the same setting; paired differences need both "
            "methods trained on the same seeds"
        )
    return results


# --- the report -------------------------------------------------------------------------------
def csv_rows(settings: dict[str, list[Group]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per setting and method: seeds, mean and std per metric; with ``baseline``, the
    paired difference to it (mean, interval, wins, paired seeds) per metric."""
    paired = _check_baseline(settings, baseline) if baseline is not None else {}
    rows = []
    for setting, groups in settings.items():
        for group in groups:
            row: dict[str, Any] = {
                "setting": setting,
                "method": group.label,
                "seeds": seed_count(group),
                "split": group.split,
            }
            for key, _, _ in METRICS:
                mean, std = mean_std(group.metric(key))
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            if baseline is not None:
                cells = (paired.get(setting) or {}).get(group.label, {})
                for key, _, _ in METRICS:
                    p = cells.get(key)
                    row[f"{key}_diff"] = p.mean if p else math.nan
                    row[f"{key}_diff_low"] = p.low if p else math.nan
                    row[f"{key}_diff_high"] = p.high if p else math.nan
                    row[f"{key}_wins"] = p.wins if p else ""
                    row[f"{key}_pairs"] = p.n if p else 0
            rows.append(row)
    return rows


def report(
    paths: list[str | Path], cost: bool = True, baseline: str | None = None, split: str = "test"
) -> str:
    """The Markdown report over every run under ``paths`` (see the module docstring).

    Raises RunDirError when ``paths`` hold no run, ConfigError for a ``baseline`` that is no
    method of the runs or shares no seed with any other method."""
    scan = scan_runs(paths)
    warnings: list[str] = []
    settings = group_runs(scan.runs, warnings, split=split)
    paired = _check_baseline(settings, baseline) if baseline is not None else {}
    parts = []
    for setting, groups in settings.items():
        parts.append(
            f"### {setting}\n\n{SPLIT_TITLES[split]}, last epoch, mean ± std over distinct seeds "
            "(sample std; n/a for one seed); best in bold, second underlined.\n"
        )
        parts.append(markdown_table(groups))
        if baseline is not None:
            if setting in paired:
                parts.append(
                    f"\nPaired difference to {baseline} (method − {baseline} on the same "
                    "seeds): mean [95 % t-interval, t with n−1 dof] wins/seeds, a win being a "
                    "seed where the method is better (lower error, NLL, ECE, AURC; higher "
                    "F1):\n\n" + paired_table(groups, baseline, paired[setting])
                )
            else:
                parts.append(f"\nNo {baseline} runs in this setting: no paired differences.")
        if cost:
            parts.append("\nCost (mean over seeds):\n\n" + cost_table(groups))
        parts.append("")
    if warnings:
        parts.append("Warnings:\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n")
    left_out = [
        f"- {run.path}: {run.note()}"
        for groups in settings.values()
        for group in groups
        for run in group.runs
        if run.status != "finished"
    ]
    left_out += [f"- {b.path}: broken: {b.reason} (skipped)" for b in scan.broken]
    if left_out:
        parts.append("Runs not in the means:\n\n" + "\n".join(left_out) + "\n")
    if not settings:
        parts.insert(0, "No readable runs.\n")
    return "\n".join(parts)
