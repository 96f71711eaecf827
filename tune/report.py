"""The end of a sweep: the per-trial table from the Optuna study, the best trial, parameter importances, and where
they go (the MLflow parent run, ``reports/<name>/``, the console).

The study, not Tune's results, is the record: it spans every driver run of a resumed sweep, and it knows which
trials ASHA stopped (PRUNED) and which failed (see :mod:`tune.search`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from dilm.coreset import full_data_set
from dilm.files import atomic_write_text, write_json
from dilm.tasks import TaskData, TaskSpec, load_task
from tune.config import SweepConfig, SweepPaths
from tune.database import dashboard_url, study_storage
from tune.plots import accuracy_vs_dpc_all
from tune.plots import param_importances as plot_importances
from tune.report_page import write_report
from tune.scores import OBJECTIVE, best_row, compare, comparison_metrics, format_compare, objective
from tune.tracking import NOTE_TAG

log = logging.getLogger("tune.report")


def load_study(cfg: SweepConfig, paths: SweepPaths) -> optuna.Study:
    return optuna.load_study(study_name=cfg.name, storage=study_storage(paths.optuna_url))


def param_importances(study) -> dict[str, float] | None:
    """fANOVA importances over the study's COMPLETE trials; None when they cannot be computed (too few trials, or
    a parameter that never varied). Optuna's warning that they are all equal (the trials tie) is a line of the log,
    not of the console's summary."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:
        log.info("no parameter importances: %s", e)
        return None
    for w in caught:
        log.info("parameter importances: %s", w.message)
    return importances


ORPHAN = "dilm.not_resumed"  # user attribute of an Optuna trial a killed driver started and the resume did not know


def fail_orphans(study) -> list[str]:
    """Once a sweep has finished no trial runs: an Optuna trial still RUNNING was started by a driver killed before
    Tune saved it in its experiment state (the resumed sweep suggested a new trial instead). Mark those FAIL (TPE
    ignores them), with the user attribute :data:`ORPHAN` (through the study's storage: a finished trial has no
    public setter), so the summary does not count them as failed trials; returns their Ray trial ids."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in orphans:
        study._storage.set_trial_user_attr(t._trial_id, ORPHAN, True)
        study.tell(t.number, state=TrialState.FAIL)
    return [t.user_attrs.get("ray_trial_id", "") for t in orphans]


def trial_state(t) -> str:
    """An Optuna trial's state name; ``NOT_RESUMED`` for one :func:`fail_orphans` marked."""
    return "NOT_RESUMED" if t.user_attrs.get(ORPHAN) else t.state.name


def summarize(study, cfg: SweepConfig, paths: SweepPaths, finished: bool) -> dict:
    """The per-trial table (from the Optuna study), counts and the best trial."""
    rows = [{"number": t.number, "ray_trial_id": t.user_attrs.get("ray_trial_id", ""), "state": trial_state(t),
             OBJECTIVE: t.value if t.state.name == "COMPLETE" else None, **t.params}
            for t in study.trials]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = best_row(complete)
    states = [r["state"] for r in rows]
    return {"name": cfg.name, "rows": rows, "best": best, "complete": len(complete),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "not_resumed": states.count("NOT_RESUMED"), "finished": finished,
            "importances": param_importances(study) if len(complete) >= 2 else None,
            "best_sets": paths.trial_sets_location(best["ray_trial_id"]) if best else None,
            "storage": paths.location, "driver_dir": str(paths.storage), "optuna_url": dashboard_url(paths.optuna_url),
            "params": sorted(cfg.search), "objective_archs": tuple(cfg.eval.objective_archs),
            "val_curves": {r["ray_trial_id"] or str(t.number): sorted(t.intermediate_values.items())
                           for r, t in zip(rows, study.trials)}}


WORD = re.compile(r"[a-z]+")
NEGATION = re.compile(r"n't\b")


def words(text: str) -> list[str]:
    """Lower-cased letter runs, with contractions split the way SST-2's tokenizer writes them: ``don't`` and SST-2's
    ``do n't`` both read as ``do``, ``not``; ``it's`` and ``it 's`` as ``it``, ``s``. Without this, fluent text
    (``don't``, ``isn't``) counts as out of a tokenised corpus's vocabulary."""
    return WORD.findall(NEGATION.sub(" not", text.lower().replace("\u2019", "'")))


def task_vocabulary(task: TaskData) -> set[str]:
    """The :func:`words` of a task's training texts (pairs: both texts)."""
    return {w for e in task.train for w in words(f"{e.text} {e.text_pair or ''}")}


def word_rate(texts: list[str], vocabulary: set[str]) -> float:
    """% of the :func:`words` of ``texts`` found in ``vocabulary``: texts a reader would accept score near 100,
    word salad ("applesurgency") far below; nan when there are no words."""
    ws = [w for t in texts for w in words(t)]
    return 100.0 * sum(w in vocabulary for w in ws) / len(ws) if ws else float("nan")


def vocab_rate(set_files: list[Path], vocabulary: set[str]) -> float:
    """:func:`word_rate` of these sets' texts (a pair's two texts together)."""
    rows = [json.loads(line) for f in set_files for line in f.read_text().splitlines()]
    return word_rate([" ".join(str(row.get(k) or "") for k in ("text", "text_pair")) for row in rows], vocabulary)


def read_copies(provenance: Path) -> dict:
    """{dpc: {"train": {...}, "test": {...}}}: the sets' copies of training and test texts (a run's provenance,
    :mod:`dilm.memorisation`); empty when the run wrote none."""
    if not provenance.exists():
        return {}
    return json.loads(provenance.read_text()).get("copies", {})


def format_copies(copies: dict[str, dict]) -> str:
    """``best trial dpc5 0.0/4.0 test 0.0/0.0, ...``: % exact / near copies of training texts, then of test texts."""
    parts = []
    for name, by_dpc in copies.items():
        for d, r in sorted(by_dpc.items(), key=lambda kv: int(kv[0])):
            parts.append(f"{name} dpc{d} {100 * r['train']['exact_share']:.1f}/{100 * r['train']['near_share']:.1f}"
                         f" test {100 * r['test']['exact_share']:.1f}/{100 * r['test']['near_share']:.1f}")
    return ", ".join(parts)


def add_baselines(summary: dict, baselines: dict, paths: SweepPaths, task: TaskSpec | str) -> None:
    """The best trial beside the baselines: ``summary["baselines"]`` rows (:func:`tune.scores.compare`) and the
    accuracy-vs-DPC plots with all curves, in ``reports/<name>/``."""
    summary["baseline_scores"] = baselines
    if not summary["best"]:
        return
    best_dir, vanilla_dir = paths.trial_dir(summary["best"]["ray_trial_id"]), paths.baseline_dir("vanilla")
    best = {int(d): s for d, s in json.loads((best_dir / "scores.json").read_text()).items()}
    summary["baselines"] = compare(best, baselines)
    data = load_task(task)
    full = full_data_set(data)
    summary["full_data"] = {"examples": len(full), "train_examples": len(data.train), "classes": data.num_classes}
    vocabulary = task_vocabulary(data)
    summary["vocab_rate"] = {name: vocab_rate(sorted(folder.glob("sets/dpc*/*.jsonl")), vocabulary)
                             for name, folder in (("best trial", best_dir), ("vanilla", vanilla_dir))}
    summary["copies"] = {name: read_copies(folder / "provenance.json") for name, folder in (
        ("best trial", best_dir), ("vanilla", vanilla_dir))}
    summary["plots"] = [str(p) for p in accuracy_vs_dpc_all(best, paths.reports_dir, f"{summary['name']}",
                                                            beside=baselines, label="best trial")]


def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def margins(summary: dict) -> dict[str, dict[str, float]]:
    """{trial id: {vs_<baseline>: objective − the baseline's objective}} of the complete trials (points, rounded to
    0.01: columns of the sweep's runs page)."""
    base = {name: objective(sc, summary.get("objective_archs", ())) for name, sc in
            summary.get("baseline_scores", {}).items() if sc}
    return {r["ray_trial_id"]: {f"vs_{name}": round(r[OBJECTIVE] - b, 2) for name, b in base.items()}
            for r in summary["rows"] if r["state"] == "COMPLETE" and r[OBJECTIVE] is not None}


def report_summary(tracker, summary: dict, paths: SweepPaths) -> None:
    """Parent run: counts, best objective, trials.csv and the parameter-importance plot; each complete trial's
    margins over the baselines; the sweep's runs-page view; the one-page report; then a console summary."""
    out = paths.reports_dir
    atomic_write_text(out / "trials.csv", _csv(summary["rows"]))
    tracker.log_artifact(out / "trials.csv")
    tracker.log_metrics({"trials_complete": summary["complete"], "trials_pruned": summary["pruned"],
                         "trials_failed": summary["failed"],
                         **({"best_objective": summary["best"][OBJECTIVE]} if summary["best"] else {})})
    if summary["best"]:
        tracker.set_tags({"dilm.best_trial": summary["best"]["ray_trial_id"],
                          "dilm.best_params": json.dumps({k: v for k, v in summary["best"].items()
                                                          if k not in ("number", "ray_trial_id", "state")})})
    for p in summary.get("plots", []):
        tracker.log_artifact(p, "plots")
    if summary.get("baselines"):
        write_json(out / "baselines.json", summary["baselines"])
        tracker.log_artifact(out / "baselines.json")
        tracker.log_metrics({f"vocab_rate/{k.replace(' ', '_')}": v for k, v in summary["vocab_rate"].items()})
        tracker.log_metrics({**comparison_metrics(summary["baselines"]), **full_data_shares(summary["baselines"])})
    if summary["best"]:
        headline = "\n".join(format_summary(summary).splitlines()[1:])
        tracker.mark_best(summary["best"]["ray_trial_id"], headline)
        tracker.set_tags({NOTE_TAG: headline})
    if summary["importances"]:
        write_json(out / "param_importances.json", summary["importances"])
        tracker.log_artifact(plot_importances(summary["importances"], out / "param_importances.png",
                                              f"{summary['name']}: importance for the objective"))
        tracker.log_artifact(out / "param_importances.json")
    for trial_id, vs in margins(summary).items():
        tracker.log_child_metrics(trial_id, vs)
    tracker.set_view(summary.get("params", ()))
    best_sets = paths.trial_sets(summary["best"]["ray_trial_id"]) if summary["best"] else None
    summary["report"] = str(write_report(summary, best_sets, out))
    tracker.log_artifact(summary["report"])
    print(format_summary(summary))


def full_data_shares(rows: list[dict]) -> dict[str, float]:
    """``best_share_of_full/<arch>/dpc<d>``: the best trial's accuracy as % of the full-data reference's."""
    return {f"best_share_of_full/{r['arch']}/dpc{r['dpc']}": 100 * r["best"] / r["full"] for r in rows
            if r.get("full")}


def format_full_data(rows: list[dict], full: dict | None) -> list[str]:
    """What a set keeps of the full data, per (arch, DPC): "DPC 10: 71.3, i.e. 84 % of the full-data accuracy
    (85.0) with 20 of 67,349 examples"."""
    if not full or not any(r.get("full") for r in rows):
        return []
    n, total = full["examples"], full["train_examples"]
    sample = "the whole training set" if n == total else f"a {n:,}-example sample of the {total:,}"
    lines = [f"  of the full data (the same protocol trained on {sample}):"]
    for r in rows:
        if r.get("full"):
            share = 100 * r["best"] / r["full"]
            lines.append(f"    {r['arch']:<18} DPC {r['dpc']:>3}: {r['best']:.1f}, i.e. {share:.0f} % of the full-data "
                         f"accuracy ({r['full']:.1f}) with {r['dpc'] * full['classes']} of {total:,} examples")
    return lines


def format_summary(s: dict) -> str:
    lines = [f"sweep {s['name']}: {s['complete']} complete, {s['pruned']} stopped early (ASHA), "
             f"{s['failed']} failed"
             + (f", {s['not_resumed']} started by a killed driver and not resumed" if s.get("not_resumed") else "")
             + ("" if s["finished"] else " — interrupted: continue with --resume")]
    if s["best"]:
        params = {k: v for k, v in s["best"].items() if k not in ("number", "ray_trial_id", "state", OBJECTIVE)}
        lines.append(f"  best objective {s['best'][OBJECTIVE]:.2f} (trial {s['best']['ray_trial_id']}): {params}")
        lines.append(f"  its sets:  {s['best_sets']}")
    if s.get("baselines"):
        lines.append("  best trial vs baselines (accuracy % ± std over sets x seeds; difference in points):")
        lines += format_compare(s["baselines"])
        lines += format_full_data(s["baselines"], s.get("full_data"))
        lines.append("  words found in the training vocabulary: " + ", ".join(
            f"{k} {v:.1f} %" for k, v in s["vocab_rate"].items()) + " (target >= 95 %)")
        if any(s.get("copies", {}).values()):
            lines.append("  copies of training texts, exact/near % (a near copy shares >= 80 % of its word 4-grams "
                         "with one text), then of test texts: " + format_copies(s["copies"]))
    if s["importances"]:
        lines.append("  importance: " + ", ".join(f"{k} {v:.2f}" for k, v in s["importances"].items()))
    lines.append(f"  storage:   {s['storage']}")
    if s.get("report"):
        lines.append(f"  report:    {s['report']}")
    lines.append(f"  MLflow:    dilm ui --storage {s.get('driver_dir', s['storage'])}")
    lines.append(f"  Optuna:    optuna-dashboard {s['optuna_url']}")
    return "\n".join(lines)
