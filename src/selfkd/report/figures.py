"""Figures over runs (PNG, matplotlib): ``selfkd plot RUN_DIRS... --out DIR``.

Runs are grouped as in the tables (:func:`selfkd.report.table.group_runs`): by setting, then by
method label; every figure names the method label and its number of seeds. Kinds:

``reliability``
    Per method, a reliability diagram of the test predictions of all its seeds pooled
    (AI-KD figures 4-5): accuracy per confidence bin as bars, mean confidence per bin as markers,
    the gap between them shaded, the diagonal of perfect calibration, the ECE in the legend.
    Next to it the same after temperature scaling, each run's logits divided by its T fitted on
    its held-out validation split; a run without a validation split gets only the uncalibrated
    panel and a note.
``tsne``
    Per method, a t-SNE (:class:`sklearn.manifold.TSNE`, fixed ``random_state``) of the
    penultimate features (``pooled`` tap) of the test samples of a chosen set of classes
    (default the first 10), one colour per class, for one run (the group's first seed).
``overlay``
    Per method whose runs learned from a superior/teacher model (AI-KD figure 6, bottom row):
    the student's and the superior model's features of the same test samples embedded in ONE
    t-SNE, student as dots, superior as crosses, colour by class.
``curves``
    Per setting, training curves of every method from RUN/metrics.jsonl: train loss (each
    method's total objective), test top-1 error and test NLL per epoch, mean over seeds with a
    shaded min-max band.
``critic``
    Per setting, AI-KD's per-epoch diagnostics from RUN/metrics.jsonl (``method.diagnostics``),
    every method label overlaid (mean over seeds, min-max band): the student's logit norm,
    centred logit norm and max-probability on the training batches (the superior's dashed, same
    colour), the critic's Wasserstein estimate and gradient penalty, ‖ω∇L_A‖/‖α_CE∇CE‖ on the
    logits, cos(∇L_A, ∇CE) and the radial cosine (dotted), and the share of ∇L_A along the
    softmax-invariant shift. Methods without these columns (``ce``) are listed, not drawn. Only
    on request: ``all`` means the four kinds above.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfkd import metrics as M
from selfkd.errors import CheckpointError, ConfigError
from selfkd.report.predictions import Predictions, collect_predictions
from selfkd.report.table import Group, find_runs, group_runs

__all__ = [
    "KINDS",
    "critic_figure",
    "curves_figure",
    "embed_tsne",
    "overlay_figure",
    "plot_runs",
    "reliability_figure",
    "tsne_figure",
]

KINDS = ("reliability", "tsne", "overlay", "curves", "critic")
#: what ``--kind all`` draws (``critic`` only on request)
ALL_KINDS = ("reliability", "tsne", "overlay", "curves")
#: (title, [(metrics.jsonl key, line style)]) of the diagnostics panels; "-" the student or the
#: main series, "--" the superior model, ":" a second series
CRITIC_PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("logit norm ‖z‖ (superior dashed)", [
        ("train_student_logit_norm", "-"), ("train_superior_logit_norm", "--")]),
    ("centred logit norm ‖z − mean z‖ (superior dashed)", [
        ("train_student_logit_cnorm", "-"), ("train_superior_logit_cnorm", "--")]),
    ("max-probability (superior dashed)", [
        ("train_student_max_prob", "-"), ("train_superior_max_prob", "--")]),
    ("critic Wasserstein estimate", [("train_critic_wdist", "-")]),
    ("critic gradient penalty (unweighted)", [("train_critic_gp", "-")]),
    ("‖ω·∇L_A‖ / ‖α_CE·∇CE‖ on the logits", [("train_adv_grad_ratio", "-")]),
    ("cos(∇L_A, ∇CE); radial cos dotted", [
        ("train_adv_ce_cos", "-"), ("train_adv_radial", ":")]),
    ("share of ∇L_A along the shift softmax ignores", [("train_adv_offset_share", "-")]),
]  # fmt: skip
#: (metrics.jsonl key, axis label) of the training-curve panels.
CURVES = [
    ("train_loss", "train loss (method's total objective)"),
    ("test_top1_err", "test top-1 error (%)"),
    ("test_nll", "test NLL (nats)"),
]
DPI = 120


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    """A pyplot-free figure (Agg canvas): nothing opens a window, no global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_") or "run"


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _class_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def _method_color(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _class_label(c: int, names: Sequence[str]) -> str:
    name = names[c] if c < len(names) else ""
    return f"{c}: {name}" if name and name != str(c) else str(c)


def _check_classes(classes: Sequence[int] | None, num_classes: int) -> list[int]:
    if classes is None:
        return list(range(min(10, num_classes)))
    out: list[int] = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
            raise ConfigError(
                f"--classes: {c!r} is not a class index of this run (0..{num_classes - 1})"
            )
        if c not in out:
            out.append(c)
    if not out:
        raise ConfigError("--classes: give at least one class index")
    return out


def _select(targets: Tensor, classes: list[int], max_points: int) -> np.ndarray:
    """Indices of the test samples of ``classes``; a fixed random subset of ``max_points``."""
    y = targets.numpy()
    idx = np.flatnonzero(np.isin(y, classes))
    if len(idx) > max_points:
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(idx, size=max_points, replace=False))
    if len(idx) < 3:
        raise ConfigError(
            f"t-SNE needs at least 3 test samples, classes {classes} have {len(idx)}; "
            "choose other --classes"
        )
    return idx


def embed_tsne(
    features: np.ndarray | Tensor, random_state: int = 0, threads: int | None = None
) -> np.ndarray:
    """2-D t-SNE of ``features`` (N×D, N ≥ 3); perplexity min(30, (N−1)/3), PCA init.

    Runs on ``threads`` CPU threads (default: ``torch.get_num_threads()``): sklearn's OpenMP
    default of every core slows t-SNE down by an order of magnitude on a busy machine.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features.numpy() if isinstance(features, Tensor) else features, np.float64)
    x = x.reshape(len(x), -1)
    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca",
        learning_rate="auto",
        random_state=random_state,
    )
    with threadpool_limits(limits=max(1, threads or torch.get_num_threads())):
        return tsne.fit_transform(x)


def _run_name(pred: Predictions) -> str:
    run = pred.config.get("run") or {}
    return f"{run.get('name', pred.run_dir.name)} (seed {run.get('seed', '?')})"


# --------------------------------------------------------------------------------------------
# reliability diagrams
# --------------------------------------------------------------------------------------------


def _reliability_panel(
    ax: Any, logits: Sequence[Tensor], targets: Sequence[Tensor], n_bins: int, title: str
) -> float:
    from matplotlib.lines import Line2D

    z, t = torch.cat(list(logits)), torch.cat(list(targets))
    b = M.reliability_bins(z, t, n_bins)
    ece = M.ece(z, t, n_bins)
    per_seed = [M.ece(zi, ti, n_bins) for zi, ti in zip(logits, targets, strict=True)]
    lower, upper = np.array(b["lower"]), np.array(b["upper"])
    count = np.array(b["count"])
    acc, conf = np.array(b["accuracy"]), np.array(b["confidence"])
    keep = count > 0
    centers, width = (lower + upper) / 2, 1.0 / n_bins

    ax.bar(
        centers[keep],
        acc[keep],
        width=width,
        color="tab:blue",
        edgecolor="black",
        linewidth=0.6,
        label="accuracy per bin",
    )
    # Gap between accuracy and mean confidence: hatched red. Above a bar (over-confidence) it is
    # also filled light red; over a bar (under-confidence) only hatched, so the bar stays blue.
    over = keep & (conf > acc)
    under = keep & (conf < acc)
    gap_style = {"width": width, "edgecolor": "tab:red", "hatch": "//", "linewidth": 0.6}
    ax.bar(
        centers[over],
        (conf - acc)[over],
        bottom=acc[over],
        color=(0.84, 0.15, 0.16, 0.25),
        label="gap |accuracy − confidence|",
        **gap_style,
    )
    ax.bar(centers[under], (acc - conf)[under], bottom=conf[under], color="none", **gap_style)
    ax.plot(
        centers[keep],
        conf[keep],
        "D",
        color="tab:orange",
        markeredgecolor="black",
        markersize=5,
        label="mean confidence per bin",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ece_text = f"ECE = {ece:.2f}% ({n_bins} bins)"
    if len(per_seed) > 1:
        ece_text += f"\nper seed {np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f}%"
    handles, labels = ax.get_legend_handles_labels()
    handles.insert(0, Line2D([], [], linestyle="none"))
    labels.insert(0, ece_text)
    ax.legend(handles, labels, loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\n{len(t)} test samples", fontsize=10)
    ax.grid(alpha=0.3)
    return ece


def reliability_figure(
    label: str,
    preds: Sequence[Predictions],
    path: str | Path,
    n_bins: int = 15,
    setting: str | None = None,
) -> Path:
    """Reliability diagram of ``preds`` (one method's seeds, pooled), with and without TS."""
    if not preds:
        raise ConfigError(f"no runs to plot for {label}")
    logits = [p.test_logits for p in preds]
    targets = [p.test_targets for p in preds]
    has_ts = all(p.temperature is not None for p in preds)
    fig = _figure(11 if has_ts else 6, 6.2)
    axes = fig.subplots(1, 2 if has_ts else 1, squeeze=False)[0]
    _reliability_panel(axes[0], logits, targets, n_bins, "without temperature scaling")
    if has_ts:
        temps = [float(p.temperature) for p in preds]  # type: ignore[arg-type]
        t_text = (
            f"T = {temps[0]:.3g}"
            if len(temps) == 1
            else f"T = {min(temps):.3g}..{max(temps):.3g} (per seed)"
        )
        _reliability_panel(
            axes[1],
            [z / t for z, t in zip(logits, temps, strict=True)],
            targets,
            n_bins,
            f"with temperature scaling ({t_text}, fitted on val)",
        )
    else:
        axes[0].text(
            0.98,
            0.02,
            "no validation split (data.val_size = 0):\ntemperature scaling not shown",
            transform=axes[0].transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "lightyellow", "alpha": 0.9},
        )
    title = f"Reliability diagram: {label} ({_seeds(len(preds))}, test split)"
    if setting:
        title += f"\n{setting}"
    fig.suptitle(title, fontsize=11)
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------------
# t-SNE
# --------------------------------------------------------------------------------------------


def _point_size(n: int) -> float:
    return 30.0 if n <= 300 else 14.0 if n <= 1500 else 6.0


def _class_legend(ax: Any, classes: list[int], colors: list[Any], names: Sequence[str], **kw: Any):
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="s", linestyle="none", color=colors[i], markersize=7)
        for i in range(len(classes))
    ]
    labels = [_class_label(c, names) for c in classes]
    return ax.legend(
        handles,
        labels,
        title="class",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        ncols=1 if len(classes) <= 20 else 2,
        **kw,
    )


def tsne_figure(
    label: str,
    pred: Predictions,
    path: str | Path,
    classes: Sequence[int] | None = None,
    max_points: int = 2000,
    n_seeds: int = 1,
    random_state: int = 0,
) -> Path:
    """t-SNE of one run's penultimate test features for ``classes``, coloured by class."""
    chosen = _check_classes(classes, pred.num_classes)
    idx = _select(pred.test_targets, chosen, max_points)
    xy = embed_tsne(pred.test_features[idx], random_state)
    y = pred.test_targets.numpy()[idx]
    colors = _class_colors(len(chosen))
    fig = _figure(8.5, 6.5)
    ax = fig.subplots()
    size = _point_size(len(idx))
    for i, c in enumerate(chosen):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=colors[i], alpha=0.8, linewidths=0)
    _class_legend(ax, chosen, colors, pred.class_names)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"t-SNE of penultimate features: {label} ({_seeds(n_seeds)}; shown: {_run_name(pred)})\n"
        f"{len(idx)} test samples of {len(chosen)} classes"
        + (f", epoch {pred.epoch}" if pred.epoch is not None else ""),
        fontsize=10,
    )
    return _save(fig, Path(path))


def overlay_figure(
    label: str,
    pred: Predictions,
    path: str | Path,
    classes: Sequence[int] | None = None,
    max_points: int = 2000,
    n_seeds: int = 1,
    random_state: int = 0,
) -> Path:
    """Student and superior features of the same test samples in one t-SNE (AI-KD fig. 6)."""
    from matplotlib.lines import Line2D

    sup = pred.superior
    if sup is None:
        raise ConfigError(f"run {pred.run_dir} has no superior/teacher model to overlay")
    chosen = _check_classes(classes, pred.num_classes)
    idx = _select(pred.test_targets, chosen, max(3, max_points // 2))
    n = len(idx)
    xy = embed_tsne(torch.cat([pred.test_features[idx], sup.test_features[idx]]), random_state)
    y = pred.test_targets.numpy()[idx]
    colors = _class_colors(len(chosen))
    who = pred.superior_key or "superior"
    fig = _figure(9, 6.8)
    ax = fig.subplots()
    size = _point_size(2 * n)
    for i, c in enumerate(chosen):
        m = y == c
        ax.scatter(
            xy[:n][m, 0], xy[:n][m, 1], s=size, marker="o", color=colors[i], alpha=0.75, lw=0
        )
        ax.scatter(
            xy[n:][m, 0], xy[n:][m, 1], s=size * 1.3, marker="x", color=colors[i], linewidths=1.2
        )
    legend = _class_legend(ax, chosen, colors, pred.class_names)
    ax.add_artist(legend)
    model_handles = [
        Line2D([], [], marker="o", linestyle="none", color="dimgray", markersize=7),
        Line2D([], [], marker="x", linestyle="none", color="dimgray", markersize=8, mew=1.5),
    ]
    ax.legend(
        model_handles,
        ["student", f"{who} model"],
        title="model",
        loc="lower left",
        bbox_to_anchor=(1.01, 0.0),
        fontsize=8,
    )
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"Student vs {who} features: {label} ({_seeds(n_seeds)}; shown: {_run_name(pred)})\n"
        f"one t-SNE of {n} test samples × 2 models, {len(chosen)} classes",
        fontsize=10,
    )
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of an interrupted run
    return rows


def _series(rows_per_run: list[list[dict[str, Any]]], key: str) -> tuple[np.ndarray, ...]:
    """(epochs, mean, min, max) over runs of ``key`` per epoch (runs lacking it skipped)."""
    by_epoch: dict[int, list[float]] = {}
    for rows in rows_per_run:
        for row in rows:
            value, epoch = row.get(key), row.get("epoch")
            if isinstance(value, (int, float)) and isinstance(epoch, int) and math.isfinite(value):
                by_epoch.setdefault(epoch, []).append(float(value))
    epochs = sorted(by_epoch)
    vals = [by_epoch[e] for e in epochs]
    return (
        np.array(epochs),
        np.array([np.mean(v) for v in vals]),
        np.array([np.min(v) for v in vals]),
        np.array([np.max(v) for v in vals]),
    )


def curves_figure(groups: Sequence[Group], path: str | Path, setting: str | None = None) -> Path:
    """Train loss, test top-1 error and test NLL per epoch; mean over seeds, min-max band."""
    data = [(g, [r for r in (_read_rows(run.path) for run in g.runs) if r]) for g in groups]
    data = [(g, rows) for g, rows in data if rows]
    if not data:
        raise ConfigError("no run has per-epoch metrics (metrics.jsonl) to plot curves from")
    fig = _figure(15, 4.8)
    axes = fig.subplots(1, len(CURVES))
    for i, (group, rows) in enumerate(data):
        color = _method_color(i)
        for ax, (key, _) in zip(axes, CURVES, strict=True):
            epochs, mean, lo, hi = _series(rows, key)
            if len(epochs) == 0:
                continue
            ax.plot(
                epochs,
                mean,
                color=color,
                marker="o" if len(epochs) <= 30 else None,
                markersize=3,
                label=f"{group.label} ({_seeds(len(rows))})",
            )
            if len(rows) > 1:
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
    for ax, (_, ylabel) in zip(axes, CURVES, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0], fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8, loc="best")
    methods = ", ".join(f"{g.label} ({_seeds(len(rows))})" for g, rows in data)
    title = f"Training curves: {methods}\nmean over seeds, shaded band = min-max over seeds"
    if setting:
        title += f"; {setting}"
    fig.suptitle(title, fontsize=11)
    return _save(fig, Path(path))


def critic_figure(groups: Sequence[Group], path: str | Path, setting: str | None = None) -> Path:
    """AI-KD's per-epoch diagnostics (:data:`CRITIC_PANELS`) of every method, overlaid."""
    keys = {key for _, series in CRITIC_PANELS for key, _ in series}
    data, without = [], []
    for g in groups:
        rows = [r for r in (_read_rows(run.path) for run in g.runs) if r]
        has = any(k in row for rs in rows for row in rs for k in keys)
        (data if has else without).append((g, rows))
    if not data:
        raise ConfigError(
            "no run has AI-KD diagnostics in metrics.jsonl (train_student_logit_norm, ...); "
            "plot AI-KD runs trained with method.diagnostics: true"
        )
    fig = _figure(18, 8)
    axes = fig.subplots(2, 4).ravel()
    for i, (group, rows) in enumerate(data):
        color = _method_color(i)
        for ax, (_, series) in zip(axes, CRITIC_PANELS, strict=True):
            for key, style in series:
                epochs, mean, lo, hi = _series(rows, key)
                if len(epochs) == 0:
                    continue
                ax.plot(
                    epochs,
                    mean,
                    color=color,
                    linestyle=style,
                    label=f"{group.label} ({_seeds(len(rows))})" if style == "-" else None,
                )
                if len(rows) > 1:
                    ax.fill_between(epochs, lo, hi, color=color, alpha=0.15, linewidth=0)
    for ax, (title, _) in zip(axes, CRITIC_PANELS, strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (axes[3], axes[6]):  # the Wasserstein estimate and the cosines: the sign matters
        ax.axhline(0.0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=8, loc="best")
    methods = ", ".join(f"{g.label} ({_seeds(len(rows))})" for g, rows in data)
    title = f"AI-KD diagnostics on the training batches, per epoch: {methods}"
    if without:
        title += "\nwithout diagnostics (not drawn): " + ", ".join(g.label for g, _ in without)
    if setting:
        title += f"\n{setting}"
    fig.suptitle(title, fontsize=10)
    return _save(fig, Path(path))


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _kinds(kind: str | Iterable[str]) -> list[str]:
    requested = [kind] if isinstance(kind, str) else list(kind)
    out: list[str] = []
    for k in requested:
        if k == "all":
            out.extend(ALL_KINDS)
        elif k in KINDS:
            out.append(k)
        else:
            raise ConfigError(
                f"unknown figure kind {k!r}; choose from {', '.join((*KINDS, 'all'))}"
            )
    return [k for k in KINDS if k in out]


def plot_runs(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    kind: str | Iterable[str] = "all",
    classes: Sequence[int] | None = None,
    max_points: int = 2000,
    which: str = "last",
    device: str = "auto",
    n_bins: int = 15,
    log: Callable[[str], Any] | None = None,
) -> list[Path]:
    """Write the figures of ``kind`` for every run under ``paths`` into ``out_dir``.

    Runs are found and grouped as by ``selfkd report``. Files: ``curves.png`` per setting,
    ``critic.png`` per setting, ``reliability-<method>.png``, ``tsne-<method>.png`` and
    ``overlay-<method>.png`` per method
    (prefixed ``setting<i>-`` when the runs span several settings). Returns the paths written.
    Raises ConfigError for an unknown kind or bad options, CheckpointError when a run needed
    for a checkpoint-based figure has no checkpoint.
    """
    kinds = _kinds(kind)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 6:
        raise ConfigError(f"--max-points must be an integer >= 6, got {max_points!r}")
    if which not in ("last", "best"):
        raise ConfigError(f"checkpoint must be 'last' or 'best', got {which!r}")
    say = log or (lambda _msg: None)
    settings = group_runs(find_runs(list(paths)))
    needs_ckpt = any(k not in ("curves", "critic") for k in kinds)
    if needs_ckpt:  # fail before any slow work
        for groups in settings.values():
            for group in groups:
                for run in group.runs:
                    ckpt = run.path / "checkpoints" / f"{which}.pt"
                    if not ckpt.is_file():
                        raise CheckpointError(
                            f"run {run.path} has no checkpoint checkpoints/{which}.pt; train "
                            "(or resume) it first, or plot only its curves with --kind curves"
                        )
    out = Path(out_dir)
    written: list[Path] = []
    cache: dict[Path, Predictions] = {}

    def predictions(run_path: Path) -> Predictions:
        if run_path not in cache:
            say(f"collecting predictions of {run_path}")
            cache[run_path] = collect_predictions(
                run_path, which, device, superior="overlay" in kinds
            )
        return cache[run_path]

    for si, (setting, groups) in enumerate(settings.items()):
        prefix = f"setting{si + 1}-" if len(settings) > 1 else ""
        if "curves" in kinds:
            try:
                written.append(curves_figure(groups, out / f"{prefix}curves.png", setting))
            except ConfigError:
                if kinds == ["curves"]:
                    raise
        if "critic" in kinds:
            try:
                written.append(critic_figure(groups, out / f"{prefix}critic.png", setting))
            except ConfigError:
                if kinds == ["critic"] and len(settings) == 1:
                    raise
        for group in groups:
            name = _slug(group.label)
            n = len(group.runs)
            if "reliability" in kinds:
                preds = [predictions(r.path) for r in group.runs]
                path = out / f"{prefix}reliability-{name}.png"
                written.append(reliability_figure(group.label, preds, path, n_bins, setting))
            if "tsne" in kinds:
                pred = predictions(group.runs[0].path)
                path = out / f"{prefix}tsne-{name}.png"
                written.append(tsne_figure(group.label, pred, path, classes, max_points, n))
            if "overlay" in kinds:
                pred = next(
                    (p for p in map(predictions, (r.path for r in group.runs)) if p.superior),
                    None,
                )
                if pred is not None:
                    path = out / f"{prefix}overlay-{name}.png"
                    written.append(overlay_figure(group.label, pred, path, classes, max_points, n))
    if kinds == ["overlay"] and not written:
        raise ConfigError(
            "no run names a superior/teacher model (method.superior or method.teacher) "
            "to overlay; pass AI-KD or TF-KD runs"
        )
    for path in written:
        say(f"wrote {path}")
    return written
