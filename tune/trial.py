"""One sweep trial: ``distill(cfg)`` with the sampled values, its sets scored on the evaluation pool, the objective.

:func:`run_trial` is the Ray Tune trainable. It gets the trial's sampled values (``config``) and a
:class:`TrialPlan` (everything else, fixed for the sweep, handed over by ``tune.with_parameters``), and reports:

* every validation of distill (every ``val_interval`` outer loops): ``{val_accuracy, step, objective: nan,
  final: False}`` — ASHA's signal (:class:`StepReporter`; every step's metrics also go to the MLflow child run);
* once, at the end: :func:`final_result` — ``objective`` (mean test accuracy over the pool's architectures and
  the DPCs: :func:`tune.scores.objective`), ``acc_<arch>`` and ``final: True``.

A trial loads its task once and hands it to the LM key, the LM stage and distill. The LM stage is shared: a trial
starts matching from the checkpoint ``<storage>/lm/<lm_cache_key>`` (:func:`lm_checkpoint_for`). The driver trains it
once before the Tuner starts when no LM key is searched; when some are, the first trial of each distinct LM config
trains it and the others wait on ``train_lm``'s lock and reuse it.

A trial resumed after a driver crash that had already written ``final.json`` reports it again instead of running
again; one that had not resumes distill from its checkpoint in the trial's output folder.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ray.tune import get_context, report

from dilm.device import use_cpu_threads
from dilm.distill import LM_META, DistillConfig, distill, lm_cache_key, train_lm
from dilm.files import write_json
from dilm.synset import read_set
from dilm.tasks import TaskData, TaskSpec, load_task
from tune.plots import accuracy_vs_dpc_all
from tune.pool import PoolClient, PoolSpec
from tune.scores import FINAL, OBJECTIVE, VAL_METRIC, ScoreTable, final_metrics, score_metrics
from tune.storage import Staged, cached_folder, join, node_cache, open_storage
from tune.tracking import TrackingSpec, TrialRun, run_label
from tune.trial_exit import join_at_exit


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its sampled values (picklable; given by ``tune.with_parameters``).
    ``label_names``/``is_pair`` are the task's, so a trial reads its sets back without loading the task."""

    task: TaskSpec  # pinned to its content hash; with a URI storage, its files are URIs too
    label_names: tuple[str, ...]
    is_pair: bool
    preset: str
    fixed: dict
    sets_dir: str
    tune_dir: str
    pool: PoolSpec
    tracking: TrackingSpec
    cpu: float
    lm_dir: str = ""  # <storage>/lm: one LM-stage checkpoint per lm_cache_key ("" = each trial runs its own)
    objective_archs: tuple[str, ...] = ()  # the archs the objective averages (eval.objective_archs; () = all)
    # sets_dir, tune_dir and lm_dir are locations: folders of the storage, or URIs (tune.storage) when it is one


def lm_checkpoint_for(cfg: DistillConfig, lm_dir: str | Path, task: TaskData | None = None) -> Path:
    """The shared LM-stage checkpoint of ``cfg``: ``<lm_dir>/<lm_cache_key>``, trained (atomically, once under a
    file lock however many callers arrive together) if it is not there yet, reused as it is otherwise. The task
    (``task``, loaded here if not given) is hashed once, for the key. With a URI ``lm_dir`` it is fetched once per
    node into the node cache, trained and published by the first caller when the storage has none."""
    task = task or load_task(cfg.task)
    key = lm_cache_key(cfg, task)
    return cached_folder(open_storage(lm_dir), key, LM_META, node_cache("lm"),
                         lambda out: train_lm(cfg, out, task=task, key=key))


def train_lm_alone(cfg: DistillConfig, lm_dir: str) -> Path:
    """:func:`lm_checkpoint_for` with as many torch threads as the Ray task's CPUs (Ray's
    ``OMP_NUM_THREADS``): a reused worker process keeps the thread count of its last task otherwise."""
    use_cpu_threads()
    return lm_checkpoint_for(cfg, lm_dir)


class StepReporter:
    """distill's callback: every step's metrics to MLflow; every validation also to Tune (ASHA's signal)."""

    def __init__(self, run: TrialRun):
        self.run = run

    def __call__(self, metrics: dict) -> None:
        step = int(metrics.get("step", 0))
        self.run.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if VAL_METRIC in metrics:
            self.run.flush()  # a trial stopped by ASHA at this report keeps its metrics
            report({OBJECTIVE: math.nan, VAL_METRIC: float(metrics[VAL_METRIC]), "step": step, FINAL: False})


def score_on_pool(sets: dict[int, list[Path]], plan: TrialPlan) -> ScoreTable:
    """{dpc: [set paths]} → {dpc: {arch: summary}}, one pool job per DPC."""
    jobs = {dpc: [read_set(p, plan.label_names, plan.is_pair) for p in paths] for dpc, paths in sets.items()}
    return PoolClient(plan.pool).score(jobs)


def final_result(scores: ScoreTable, best_val: float | None, step: int, only: tuple[str, ...] = ()) -> dict:
    """The trial's last report: the objective (over ``only``, default all archs) and each architecture's mean over
    DPCs (``acc_<arch>``; :func:`tune.scores.final_metrics`), the best validation accuracy and the step."""
    return {**final_metrics(scores, only), VAL_METRIC: math.nan if best_val is None else float(best_val), "step": step,
            FINAL: True}


def log_trial_outputs(run: TrialRun, result, scores: ScoreTable, final: dict, out: Path) -> None:
    write_json(out / "scores.json", {str(d): s for d, s in scores.items()})
    plots = accuracy_vs_dpc_all(scores, out / "plots", title=out.name)
    run.log_metrics({**score_metrics(scores), **{k: v for k, v in final.items() if k.startswith(("acc_", OBJECTIVE))}},
                    final["step"])
    run.flush()
    run.log_artifacts(out / "sets", "sets")
    run.log_artifact(result.provenance)
    run.log_artifact(out / "scores.json")
    for p in plots:
        run.log_artifact(p, "plots")


def run_trial(config: dict, plan: TrialPlan) -> None:
    """The Ray Tune trainable: distill with this trial's values, score the sets on the pool, report the objective.
    (Tune checks a restored sweep's trainable by this function's name: keep it ``run_trial``.)"""
    ctx = get_context()
    trial_id = ctx.get_trial_id()
    folder = Staged(plan.sets_dir, trial_id)  # a URI storage: written in the node cache, published at the end
    out = folder.path
    done = folder.committed("final.json")
    if done is not None:  # finished before a driver crash: report again, do not run again
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # the crash may have come before the removal below
        report(done)
        return
    use_cpu_threads(plan.cpu)  # floor(cpu), at least 1, at most the CPUs this process may use and OMP_NUM_THREADS
    join_at_exit()  # a trial ASHA stops ends without a native stack trace (tune.trial_exit)
    with TrialRun(plan.tracking, trial_id, run_label(trial_id, config)) as run:
        run.set_tags({"dilm.output_dir": folder.uri, "dilm.tune_trial_dir": join(plan.tune_dir, trial_id)})
        run.log_params(config)  # the sampled values, logged even if the config turns out invalid
        cfg = DistillConfig.from_preset(plan.preset, **{**plan.fixed, **config}, task=plan.task, output_dir=str(out))
        task = load_task(cfg.task)  # once: the LM key, the LM stage and distill share it
        if plan.lm_dir and not cfg.lm_checkpoint:
            cfg = dataclasses.replace(cfg, lm_checkpoint=str(lm_checkpoint_for(cfg, plan.lm_dir, task)))
        run.log_params(cfg.to_dict())
        result = distill(cfg, callback=StepReporter(run), task=task)
        scores = score_on_pool(result.sets, plan)
        last_step = result.history[-1]["step"] if result.history else 0
        final = final_result(scores, result.best_val_accuracy, last_step, plan.objective_archs)
        log_trial_outputs(run, result, scores, final, out)
        write_json(out / "final.json", final)
        folder.publish(last=["final.json"], skip=["checkpoint"])  # final.json: the commit marker, uploaded last
        run.rename(run_label(trial_id, config, final[OBJECTIVE]))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # generator weights: only needed to resume this trial
    report(final)
