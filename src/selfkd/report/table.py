"""Tables over runs: group by setting, then by method, and report mean ± std over seeds.

A *setting* is everything in a run's resolved config except the method, the seed and where the
run lives; runs of different settings are never averaged together (each setting gets its own
table). A method's *label* is its name plus every hyper-parameter that differs from the method's
defaults (phase-1 checkpoint paths excluded), e.g. ``aikd (ablation=no_adv)``. Runs that did not
finish are listed as such, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfkd.errors import RunDirError

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
COST: list[tuple[str, str]] = [
    ("sec_per_iter", "s/iter"),
    ("parameters", "params"),
    ("peak_memory_mb", "peak MB"),
]
TEACHER_PARAMS = ("superior", "teacher")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    final: dict[str, Any] | None

    @property
    def status(self) -> str:
        if self.final is None:
            return "incomplete"
        return str(self.final.get("status", "unknown"))


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        out = []
        for run in self.runs:
            value = (run.final or {}).get(key)
            if run.status == "finished" and isinstance(value, (int, float)):
                out.append(float(value))
        return out


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run directory (one holding config.yaml) under ``paths``, phase-1 runs included."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for base in map(Path, paths):
        if not base.exists():
            raise RunDirError(f"{base} does not exist; pass run directories or folders of runs")
        candidates = (
            [base]
            if (base / "config.yaml").is_file()
            else sorted(p.parent for p in base.rglob("config.yaml"))
        )
        for path in candidates:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            config = normalized_config(yaml.safe_load((path / "config.yaml").read_text()) or {})
            final_path = path / "final.json"
            final = json.loads(final_path.read_text()) if final_path.is_file() else None
            runs.append(Run(path=path, config=config, final=final))
    if not runs:
        raise RunDirError(
            f"no run directories (with config.yaml) under {', '.join(map(str, paths))}"
        )
    return runs


def normalized_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The config with today's defaults filled in, so runs written before a new config key
    existed group with runs written after (the method section is kept as written)."""
    from selfkd.config import config_from_dict
    from selfkd.errors import ConfigError

    try:
        full = config_from_dict({k: v for k, v in raw.items() if k != "method"}).to_dict()
    except ConfigError:
        return raw
    full["method"] = raw.get("method") or {}
    return full


def setting_key(config: dict[str, Any]) -> str:
    """A readable summary + hash of everything but the method, seed and run location."""
    shaping = {k: v for k, v in config.items() if k not in ("method", "run")}
    run = {
        k: v
        for k, v in (config.get("run") or {}).items()
        if k in ("deterministic", "amp", "channels_last")
    }
    blob = json.dumps({**shaping, "run": run}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    data, model, train = config.get("data", {}), config.get("model", {}), config.get("train", {})
    opts = ",".join(f"{k}={v}" for k, v in sorted((model.get("options") or {}).items()))
    subset = f", {data.get('per_class')}/class" if data.get("per_class") else ""
    return (
        f"{data.get('name')}{subset} / {model.get('name')}{f'({opts})' if opts else ''} / "
        f"{train.get('epochs')} epochs [{digest}]"
    )


def method_label(method: dict[str, Any]) -> str:
    """Method name plus its non-default hyper-parameters."""
    from selfkd.errors import ConfigError
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


def group_runs(runs: list[Run]) -> dict[str, list[Group]]:
    settings: dict[str, dict[str, Group]] = {}
    for run in runs:
        setting = setting_key(run.config)
        label = method_label(run.config.get("method") or {})
        groups = settings.setdefault(setting, {})
        groups.setdefault(label, Group(label)).runs.append(run)
    return {
        s: sorted(g.values(), key=lambda g: (g.label != "ce", g.label))
        for s, g in sorted(settings.items())
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(groups: list[Group]) -> str:
    """One setting's table; best mean in bold, second underlined (finished runs only)."""
    present = [(k, t, low) for k, t, low in METRICS if any(g.values(f"test_{k}") for g in groups)]
    rank: dict[tuple[str, str], int] = {}
    for key, _, lower in present:
        means = sorted(
            {
                round(mean_std(g.values(f"test_{key}"))[0], 6)
                for g in groups
                if g.values(f"test_{key}")
            },
            reverse=not lower,
        )
        for group in groups:
            vals = group.values(f"test_{key}")
            if vals:
                rank[(group.label, key)] = means.index(round(mean_std(vals)[0], 6))
    lines = [
        "| method | seeds | " + " | ".join(t for _, t, _ in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for group in groups:
        finished = sum(r.status == "finished" for r in group.runs)
        other = [r.status for r in group.runs if r.status != "finished"]
        seeds = f"{finished}" + (
            f" (+{len(other)} {'/'.join(sorted(set(other)))})" if other else ""
        )
        cells = []
        for key, _, _ in present:
            vals = group.values(f"test_{key}")
            if not vals:
                cells.append("-")
                continue
            text = _fmt(*mean_std(vals), 4 if key.startswith("nll") else 2)
            r = rank.get((group.label, key))
            cells.append(f"**{text}**" if r == 0 else f"<u>{text}</u>" if r == 1 else text)
        lines.append(f"| {group.label} | {seeds} | " + " | ".join(cells) + " |")
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


def csv_rows(settings: dict[str, list[Group]]) -> list[dict[str, Any]]:
    rows = []
    for setting, groups in settings.items():
        for group in groups:
            row: dict[str, Any] = {
                "setting": setting,
                "method": group.label,
                "seeds": len(group.values("test_top1_err")),
            }
            for key, _, _ in METRICS:
                mean, std = mean_std(group.values(f"test_{key}"))
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            rows.append(row)
    return rows


def report(paths: list[str | Path], cost: bool = True) -> str:
    """The Markdown report over every run under ``paths``."""
    settings = group_runs(find_runs(paths))
    parts = []
    for setting, groups in settings.items():
        parts.append(
            f"### {setting}\n\nTest split, last epoch, mean ± std over seeds "
            "(sample std); best in bold, second underlined.\n"
        )
        parts.append(markdown_table(groups))
        if cost:
            parts.append("\nCost (mean over seeds):\n\n" + cost_table(groups))
        parts.append("")
    return "\n".join(parts)
