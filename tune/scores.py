"""The sweep's score table: the objective, the names of the metrics and the comparisons, in one place.

A **score table** is what the evaluation pool answers for a trial's (or a baseline's) sets: ``{dpc: {arch: summary}}``,
each summary an architecture's :meth:`dilm.evaluate.ArchScores.summary` (``accuracy`` and ``accuracy_std`` in %,
over sets × seeds; ``n``; ...). From it:

* the **objective** — what the searcher maximises: the mean over architectures (the sweep's ``eval.objective_archs``,
  by default all) of each one's mean accuracy over the DPCs (:func:`objective`; ``acc_<arch>`` the
  per-architecture means of every architecture);
* the metric names — a trial's reports to Tune (:data:`OBJECTIVE`, :data:`VAL_METRIC`, :data:`FINAL`) and the names
  its scores are logged under in MLflow (:func:`score_metrics`), the same for a baseline run;
* the comparisons of the summary — the best trial (:func:`best_row`) beside each baseline, arch by DPC
  (:func:`compare`, :func:`format_compare`, :func:`comparison_metrics`), with Welch's interval of
  :mod:`dilm.stats`.
"""

from __future__ import annotations

import statistics

from dilm.stats import welch_interval

BASELINES = ("random", "vanilla", "kcenters", "herding", "full")  # beside every sweep (:mod:`tune.baselines`)
FULL = "full"  # the full-data reference: a ceiling, not a rival (no objective; its own lines in the summary)
RIVALS = tuple(b for b in BASELINES if b != FULL)  # the baselines a trial is compared with

ScoreTable = dict[int, dict[str, dict]]  # {dpc: {arch: {"accuracy", "accuracy_std", "n", ...}}}

# The keys of a trial's results (``tune.report``), read by the searcher, the scheduler and the summary.
FINAL = "final"  # True on a trial's last report (scores from the pool), False on validation reports
OBJECTIVE = "objective"  # the searcher's metric: mean accuracy (%) over the objective's archs and the DPCs
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


def objective(scores: ScoreTable, only: tuple[str, ...] = ()) -> float:
    """The sweep's objective: the mean over architectures of :func:`per_arch`, over ``only`` those when given
    (the others stay columns of the comparison, out of what the searcher maximises)."""
    means = per_arch(scores)
    return statistics.fmean(v for a, v in means.items() if not only or a in only)


def final_metrics(scores: ScoreTable, only: tuple[str, ...] = ()) -> dict[str, float]:
    """The objective (over ``only``, see :func:`objective`) and each architecture's mean over DPCs (``acc_<arch>``):
    a trial's final report."""
    return {OBJECTIVE: objective(scores, only), **{f"acc_{a}": v for a, v in per_arch(scores).items()}}


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


def accuracy_sample(s: dict) -> dict:
    """A score summary (``accuracy``, ``accuracy_std``, ``n`` over independent (set, seed) pairs) as the
    ``{mean, std, n}`` summary that :func:`dilm.stats.welch_interval` compares."""
    return {"mean": s["accuracy"], "std": s["accuracy_std"], "n": s.get("n", 0)}


def compare(best: ScoreTable, baselines: dict[str, ScoreTable]) -> list[dict]:
    """Rows (arch, dpc): the best trial's accuracy ± std (over n sets × seeds), each baseline's, the difference in
    points (``vs_<baseline>``) and its 95 % interval (``vs_<baseline>_lo`` / ``_hi``, Welch)."""
    rows = []
    for d in sorted(best):
        for a in sorted(best[d]):
            mine = best[d][a]
            row = {"arch": a, "dpc": d, "best": mine["accuracy"], "best_std": mine["accuracy_std"],
                   "best_n": mine.get("n", 0)}
            for name, sc in baselines.items():
                if a in sc.get(d, {}):
                    theirs = sc[d][a]
                    row[name] = theirs["accuracy"]
                    row[f"{name}_std"] = theirs["accuracy_std"]
                    row[f"vs_{name}"] = row["best"] - row[name]
                    ci = welch_interval(accuracy_sample(mine), accuracy_sample(theirs))
                    if ci["lo"] is not None:
                        row[f"vs_{name}_lo"], row[f"vs_{name}_hi"] = ci["lo"], ci["hi"]
            rows.append(row)
    return rows


def compared(rows: list[dict]) -> list[str]:
    """The baselines that :func:`compare` rows hold, in their order."""
    return list(dict.fromkeys(k.removeprefix("vs_") for r in rows for k in r
                              if k.startswith("vs_") and not k.endswith(("_lo", "_hi"))))


def _difference(r: dict, n: str) -> str:
    """``+4.1 [+1.2, +7.0]``: the difference and its 95 % interval (``*`` when the interval excludes 0)."""
    if f"vs_{n}_lo" not in r:
        return f"{r['vs_' + n]:+6.1f}" + " " * 17
    lo, hi = r[f"vs_{n}_lo"], r[f"vs_{n}_hi"]
    return f"{r['vs_' + n]:+6.1f} [{lo:+5.1f},{hi:+5.1f}]{'*' if lo > 0 or hi < 0 else ' '}"


def format_compare(rows: list[dict]) -> list[str]:
    """The summary's table: best trial vs each baseline, accuracy ± std over n sets × seeds, the difference in points
    with its 95 % interval (``*``: the interval excludes 0)."""
    names = [n for n in compared(rows) if n != FULL]  # the full data has its own lines (share of its accuracy)
    lines = ["  arch               DPC  best trial (n)    " + "".join(f"{n:<15}best-{n} [95% CI]{'':<10}"
                                                                  for n in names)]
    for r in rows:
        cells = "".join(f"{r[n]:5.1f} ± {r[n + '_std']:4.1f}   {_difference(r, n)}  " if n in r else " " * 42
                        for n in names)
        lines.append(f"  {r['arch']:<18} {r['dpc']:>3}  {r['best']:5.1f} ± {r['best_std']:4.1f} ({r['best_n']:>3})  "
                     f"{cells}".rstrip())
    return lines


def comparison_metrics(rows: list[dict]) -> dict[str, float]:
    """MLflow metric names for :func:`compare` rows: ``best_vs_<baseline>/<arch>/dpc<d>`` in points, and the ends of
    its 95 % interval (``best_vs_<baseline>_lo/...``, ``_hi``)."""
    out = {}
    for r in rows:
        for n in compared(rows):
            for suffix in ("", "_lo", "_hi"):
                if f"vs_{n}{suffix}" in r:
                    out[f"best_vs_{n}{suffix}/{r['arch']}/dpc{r['dpc']}"] = r[f"vs_{n}{suffix}"]
    return out
