"""The sweep's score table: the objective, the names of the metrics and the comparisons, in one place.

A **score table** is what the evaluation pool answers for a trial's (or a baseline's) sets: ``{dpc: {arch: summary}}``,
each summary an architecture's :meth:`dilm.evaluate.ArchScores.summary` (``accuracy`` and ``accuracy_std`` in %,
over sets × seeds; ``n``; ...). From it:

* the **objective** — what the searcher maximises: the mean over architectures of each one's mean accuracy over the
  DPCs (:func:`objective`; ``acc_<arch>`` those per-architecture means);
* the metric names — a trial's reports to Tune (:data:`OBJECTIVE`, :data:`VAL_METRIC`, :data:`FINAL`) and the names
  its scores are logged under in MLflow (:func:`score_metrics`), the same for a baseline run;
* the comparisons of the summary — the best trial (:func:`best_row`) beside each baseline, arch by DPC
  (:func:`compare`, :func:`format_compare`, :func:`comparison_metrics`).
"""

from __future__ import annotations

import statistics

ScoreTable = dict[int, dict[str, dict]]  # {dpc: {arch: {"accuracy", "accuracy_std", "n", ...}}}

# The keys of a trial's results (``tune.report``), read by the searcher, the scheduler and the summary.
FINAL = "final"  # True on a trial's last report (scores from the pool), False on validation reports
OBJECTIVE = "objective"  # the searcher's metric: mean accuracy (%) over the pool's archs and the DPCs
VAL_METRIC = "val_accuracy"  # ASHA's metric: distill's validation accuracy every val_interval outer loops
MODE = "max"  # both are maximised


def archs(scores: ScoreTable) -> list[str]:
    """The architectures found at any DPC, sorted."""
    return sorted({a for per_arch in scores.values() for a in per_arch})


def curve(scores: ScoreTable, arch: str) -> tuple[list[int], list[float], list[float]]:
    """One architecture against DPC: the DPCs that scored it (ascending), its mean accuracies and their stds."""
    dpcs = sorted(d for d in scores if arch in scores[d])
    return dpcs, [scores[d][arch]["accuracy"] for d in dpcs], [scores[d][arch]["accuracy_std"] for d in dpcs]


def per_arch(scores: ScoreTable) -> dict[str, float]:
    """Each architecture's mean accuracy over the DPCs that scored it."""
    return {a: statistics.fmean(scores[d][a]["accuracy"] for d in scores if a in scores[d]) for a in archs(scores)}


def objective(scores: ScoreTable) -> float:
    """The sweep's objective: the mean over architectures of :func:`per_arch`."""
    return statistics.fmean(per_arch(scores).values())


def final_metrics(scores: ScoreTable) -> dict[str, float]:
    """The objective and each architecture's mean over DPCs (``acc_<arch>``): a trial's final report."""
    return {OBJECTIVE: objective(scores), **{f"acc_{a}": v for a, v in per_arch(scores).items()}}


def score_metrics(scores: ScoreTable) -> dict[str, float]:
    """MLflow metric names for a score table: ``accuracy/<arch>/dpc<d>`` and ``accuracy_std/...``."""
    out = {}
    for d, per in scores.items():
        for a, s in per.items():
            out[f"accuracy/{a}/dpc{d}"] = s["accuracy"]
            out[f"accuracy_std/{a}/dpc{d}"] = s["accuracy_std"]
    return out


def best_row(rows: list[dict]) -> dict | None:
    """The row (a trial) with the best :data:`OBJECTIVE`; None when there is none."""
    return max(rows, key=lambda r: r[OBJECTIVE], default=None)


def compare(best: ScoreTable, baselines: dict[str, ScoreTable]) -> list[dict]:
    """Rows (arch, dpc): the best trial's accuracy ± std, each baseline's, and the difference in points
    (``vs_<baseline>``)."""
    rows = []
    for d in sorted(best):
        for a in sorted(best[d]):
            row = {"arch": a, "dpc": d, "best": best[d][a]["accuracy"], "best_std": best[d][a]["accuracy_std"]}
            for name, sc in baselines.items():
                if a in sc.get(d, {}):
                    row[name] = sc[d][a]["accuracy"]
                    row[f"{name}_std"] = sc[d][a]["accuracy_std"]
                    row[f"vs_{name}"] = row["best"] - row[name]
            rows.append(row)
    return rows


def compared(rows: list[dict]) -> list[str]:
    """The baselines that :func:`compare` rows hold, in their order."""
    return list(dict.fromkeys(k.removeprefix("vs_") for r in rows for k in r if k.startswith("vs_")))


def format_compare(rows: list[dict]) -> list[str]:
    """The summary's table: best trial vs each baseline, accuracy ± std over sets × seeds, difference in points."""
    names = compared(rows)
    lines = ["  arch               DPC  best trial     " + "".join(f"{n:<15}best-{n:<9}" for n in names)]
    for r in rows:
        cells = "".join(f"{r[n]:5.1f} ± {r[n + '_std']:4.1f}   {r['vs_' + n]:+6.1f}        " if n in r else " " * 30
                        for n in names)
        lines.append(f"  {r['arch']:<18} {r['dpc']:>3}  {r['best']:5.1f} ± {r['best_std']:4.1f}   {cells}".rstrip())
    return lines


def comparison_metrics(rows: list[dict]) -> dict[str, float]:
    """MLflow metric names for :func:`compare` rows: ``best_vs_<baseline>/<arch>/dpc<d>``, in points."""
    names = compared(rows)
    return {f"best_vs_{n}/{r['arch']}/dpc{r['dpc']}": r[f"vs_{n}"] for r in rows for n in names if f"vs_{n}" in r}
