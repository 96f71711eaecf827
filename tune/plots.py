"""Figures logged as MLflow artifacts and drawn into the sweep's report: accuracy vs DPC per architecture, the sweep's
parameter importances, validation over steps and the optimization history.

Built with matplotlib's object API (``Figure`` rendered by the Agg canvas): no pyplot global state, no display,
safe in Ray workers. Each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dilm.files import atomic_path
from tune.scores import ScoreTable, archs, curve


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def safe_name(arch: str) -> str:
    """An architecture name usable as a file name (``icl-smollm2`` stays, ``/path/model`` → ``_path_model``)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in arch)


def accuracy_vs_dpc(scores: ScoreTable, arch: str, path: str | Path, title: str = "",
                    beside: dict[str, ScoreTable] | None = None, label: str = "") -> Path:
    """One architecture's mean accuracy ± std (over sets × seeds) against DPC; ``beside`` adds other curves
    ({name: scores}, e.g. the sweep's baselines ``random`` and ``vanilla``) with a legend.

    ``scores``: a score table (:mod:`tune.scores`) as returned by the evaluation pool.
    """
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.add_subplot()
    dpcs = []
    for name, sc in {label or arch: scores, **(beside or {})}.items():
        ds, acc, std = curve(sc, arch)
        ax.errorbar(ds, acc, yerr=std, marker="o", capsize=3, label=name)
        dpcs = sorted(set(dpcs) | set(ds))
    if beside:
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(dpcs, [str(d) for d in dpcs])
    ax.set_xlabel("data per class (DPC)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or arch, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_vs_dpc_all(scores: ScoreTable, out_dir: str | Path, title: str = "",
                        beside: dict[str, ScoreTable] | None = None, label: str = "") -> list[Path]:
    """One ``accuracy_vs_dpc_<arch>.png`` per architecture found in ``scores`` (``beside``: see above)."""
    return [accuracy_vs_dpc(scores, a, Path(out_dir) / f"accuracy_vs_dpc_{safe_name(a)}.png",
                            f"{title} — {a}" if title else a, beside, label) for a in archs(scores)]


def param_importances(importances: dict[str, float], path: str | Path, title: str = "") -> Path:
    """Horizontal bars, most important parameter on top (values as from ``optuna.importance``)."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig = Figure(figsize=(5, 0.5 + 0.4 * max(1, len(items))))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    for y, (_, v) in enumerate(items):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("importance for the objective")
    ax.set_xlim(0, max([v for _, v in items] + [1e-9]) * 1.2)
    ax.set_title(title or "hyperparameter importances", fontsize=10)
    return _save(fig, path)


def validation_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Validation accuracy against distill's step, one line per trial ({label: [(step, accuracy)]}: the
    intermediate values the Optuna study holds); a trial ASHA stopped is a short line."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.add_subplot()
    for label, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=label)
    if 0 < len(curves) <= 12:
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "validation over steps", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def optimization_history(values: list[tuple[int, float]], path: str | Path, title: str = "") -> Path:
    """The objective of each complete trial by trial number ([(number, objective)]) and the best so far."""
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.add_subplot()
    points = sorted(values)
    best = [max(v for _, v in points[: i + 1]) for i in range(len(points))]
    ax.plot([n for n, _ in points], [v for _, v in points], "o", label="trial")
    ax.step([n for n, _ in points], best, where="post", label="best so far")
    ax.legend(fontsize=8)
    ax.set_xlabel("trial number")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("objective (%)")
    ax.set_title(title or "optimization history", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)
