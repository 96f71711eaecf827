"""Hyperparameter sweeps of DiLM distillation: Ray Tune trials, Optuna TPE search, ASHA early stopping, MLflow.

    python -m tune.sweep --config sweeps/sst2.yaml [--smoke] [--resume] [--name N] [--storage DIR]

Vocabulary
  * **sweep** — one named search described by a YAML file (:class:`SweepConfig`): ``fixed`` DistillConfig values,
    a ``search`` space (data: ``{type: loguniform|uniform|int|categorical, ...}`` per DistillConfig key), budgets
    and resources.
  * **trial** — one ``distill(cfg)`` with sampled values (:func:`run_trial`) on a resource share
    (``tune.with_resources``; fractional GPUs allowed), followed by scoring its sets on the evaluation pool.
  * **objective** — the trial's final metric: mean test accuracy (%) over the pool's architectures and the DPCs.
  * **validation accuracy** — ``val_accuracy`` reported by distill every ``val_interval`` outer loops; the
    intermediate signal on which ASHA stops trials early.

ASHA and Optuna. ``OptunaSearch`` has no pruner of its own and stores a trial that ASHA stopped as COMPLETE with its
last reported value — here a validation accuracy or nothing, not an objective. :class:`PruneAwareOptunaSearch`
tells the study the truth instead: intermediate ``val_accuracy`` values go to ``trial.report`` (visible in
optuna-dashboard, and used by TPE to rank pruned trials), a trial whose last result carries ``final: True`` is
COMPLETE with its objective, an errored trial FAIL, and any other (stopped early) trial PRUNED — so TPE fits its
"good" density on real objectives only and the parameter importances use complete trials only. Intermediate
reports carry ``objective: nan`` (every result must hold the searcher's metric), never a stand-in value; Optuna
itself shows a pruned trial's last intermediate value as its value, labelled PRUNED.

Storage (``--storage``, else the YAML's ``storage``, else ``$DILM_SWEEP_DIR`` or ``./runs/sweeps``; absolute)::

    mlflow.db, mlartifacts/      MLflow store shared by all sweeps here (``dilm ui``), unless $MLFLOW_TRACKING_URI
    optuna.db                    one Optuna study per sweep name (``optuna-dashboard sqlite:////<storage>/optuna.db``)
    tune/<name>/                 the Ray Tune experiment (what ``--resume`` restores); ``tune_storage`` may move it
    sets/<name>/<trial_id>/      a trial's distill output: sets/, provenance.json, scores.json, plots/, final.json
                                 (and checkpoint/ while it runs: removed when it ends, kept if it errored)
    state/<name>.json            the MLflow parent run id, so a resumed sweep continues the same parent run
    reports/<name>/              trials.csv and the parameter-importance plot of the sweep

Fault tolerance: ``FailureConfig(max_failures)`` retries a failing trial (distill resumes from its checkpoint in the
trial's output folder); a trial that still fails is recorded (Tune error, MLflow child FAILED, Optuna FAIL) and the
sweep goes on. A driver killed even by SIGKILL resumes with ``--resume`` (``Tuner.restore(resume_errored=True)``
and the same Optuna study); a trial that had written its ``final.json`` reports it again instead of re-running.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import ray
import torch
import yaml
from optuna.trial import TrialState
from ray.tune import (
    Callback,
    FailureConfig,
    RunConfig,
    TuneConfig,
    Tuner,
    get_context,
    report,
    with_parameters,
    with_resources,
)
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from dilm import DilmError
from dilm.distill import PRESETS, DistillConfig, distill
from dilm.evaluate import EvalConfig
from dilm.synset import atomic_write_text, read_set, write_json
from dilm.tasks import load_task
from tune.plots import accuracy_vs_dpc_all
from tune.plots import param_importances as plot_importances
from tune.pool import PoolClient, PoolError, PoolSpec, create_pool, shutdown_pool
from tune.tracking import SweepTracker, TrackingSpec, TrialRun, default_storage, flatten, tracking_uri

log = logging.getLogger("tune.sweep")

FINAL = "final"  # result key: True on a trial's last report (scores from the pool), False on validation reports
OBJECTIVE = "objective"
VAL_METRIC = "val_accuracy"
SEARCH_TYPES = ("loguniform", "uniform", "int", "categorical")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- configuration


def _build(cls, raw, where: str):
    """Construct dataclass ``cls`` from a YAML mapping; unknown or missing keys give a one-line DilmError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DilmError(f"{where} must be a mapping, got {type(raw).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise DilmError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in raw]
    if missing:
        raise DilmError(f"{where}: missing key(s) {missing}")
    return cls(**raw)


def _number(value, where: str, kind=float):
    if isinstance(value, bool):
        raise DilmError(f"{where} must be a number, got {value!r}")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise DilmError(f"{where} must be a number, got {value!r}") from None
    if kind is int and out != float(value):
        raise DilmError(f"{where} must be an integer, got {value!r}")
    return out


@dataclass(frozen=True)
class Resources:
    """A Ray resource share: logical CPUs and a GPU fraction."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "cpu", _number(self.cpu, "cpu"))
        object.__setattr__(self, "gpu", _number(self.gpu, "gpu"))
        if self.cpu < 0 or self.gpu < 0:
            raise DilmError(f"resources must be >= 0, got cpu={self.cpu:g} gpu={self.gpu:g}")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise DilmError(f"a GPU share above 1 must be whole, got {self.gpu:g}")

    def as_tune(self) -> dict:
        return {"cpu": self.cpu, **({"gpu": self.gpu} if self.gpu else {})}


@dataclass(frozen=True)
class SearchParam:
    """One dimension of the search space (data, no computation)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple | None = None

    def __post_init__(self):
        where = f"search.{self.name}"
        if self.type not in SEARCH_TYPES:
            raise DilmError(f"{where}: unknown type {self.type!r}; known types: {', '.join(SEARCH_TYPES)}")
        if self.type == "categorical":
            if not isinstance(self.choices, list | tuple) or not self.choices:
                raise DilmError(f"{where}: categorical needs a non-empty list of choices")
            bad = [c for c in self.choices if c is not None and not isinstance(c, bool | int | float | str)]
            if bad:
                raise DilmError(f"{where}: choices must be scalars (numbers, strings, booleans), got {bad[0]!r}")
            object.__setattr__(self, "choices", tuple(self.choices))
            return
        if self.choices is not None:
            raise DilmError(f"{where}: 'choices' belongs to categorical parameters only")
        if self.low is None or self.high is None:
            raise DilmError(f"{where}: {self.type} needs low and high")
        kind = int if self.type == "int" else float
        object.__setattr__(self, "low", _number(self.low, f"{where}.low", kind))
        object.__setattr__(self, "high", _number(self.high, f"{where}.high", kind))
        if self.step is not None:
            object.__setattr__(self, "step", _number(self.step, f"{where}.step", kind))
        if not self.low < self.high:
            raise DilmError(f"{where}: low ({self.low}) must be below high ({self.high})")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise DilmError(f"{where}: a log scale needs low > 0, got {self.low}")

    def distribution(self):
        dist = optuna.distributions
        if self.type == "categorical":
            return dist.CategoricalDistribution(self.choices)
        if self.type == "int":
            return dist.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        log_scale = self.type == "loguniform" or self.log
        return dist.FloatDistribution(self.low, self.high, log=log_scale, step=None if log_scale else self.step)


@dataclass(frozen=True)
class AshaConfig:
    """ASHA on ``val_accuracy``; ``time_attr`` counts validation reports (``training_iteration``) or distill steps
    (``step``). ``max_t`` must exceed what a full trial reaches, or ASHA stops every trial before its final report."""

    time_attr: str = "training_iteration"
    max_t: int = 1000
    grace_period: int = 1
    reduction_factor: float = 2

    def __post_init__(self):
        if self.time_attr not in ("training_iteration", "step"):
            raise DilmError(f"asha.time_attr must be training_iteration or step, got {self.time_attr!r}")
        object.__setattr__(self, "max_t", _number(self.max_t, "asha.max_t", int))
        object.__setattr__(self, "grace_period", _number(self.grace_period, "asha.grace_period", int))
        object.__setattr__(self, "reduction_factor", _number(self.reduction_factor, "asha.reduction_factor"))
        if not 1 <= self.grace_period < self.max_t:
            raise DilmError(f"asha needs 1 <= grace_period < max_t, got {self.grace_period} and {self.max_t}")
        if self.reduction_factor <= 1:
            raise DilmError(f"asha.reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation pool: ``EvalConfig`` fields (archs, seeds, steps, test_limit, device, ...) plus the actors."""

    archs: tuple[str, ...] = ("minilm-l6",)
    seeds: int = 3
    steps: int = 200
    test_limit: int | None = None
    device: str = "auto"
    ensemble: int = 16
    batch_size: int = 64
    actors: int = 1
    actor_resources: Resources = field(default_factory=Resources)
    max_restarts: int = 3
    retries: int = 3

    def __post_init__(self):
        object.__setattr__(self, "archs", tuple(self.archs) if isinstance(self.archs, list | tuple) else (self.archs,))
        if isinstance(self.actor_resources, dict | None):
            object.__setattr__(self, "actor_resources", _build(Resources, self.actor_resources,
                                                               "eval.actor_resources"))
        for key in ("actors", "max_restarts", "retries"):
            object.__setattr__(self, key, _number(getattr(self, key), f"eval.{key}", int))
        if self.actors < 1 or self.max_restarts < 0 or self.retries < 0:
            raise DilmError("eval needs actors >= 1, max_restarts >= 0 and retries >= 0")
        self.eval_config()  # validates the EvalConfig part now, not in an actor

    def eval_config(self) -> EvalConfig:
        return EvalConfig(archs=self.archs, seeds=self.seeds, steps=self.steps, test_limit=self.test_limit,
                          device=self.device, ensemble=self.ensemble, batch_size=self.batch_size, progress=False)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep as read from YAML; ``fixed`` and ``search`` keys are DistillConfig options (``fixed.preset`` picks
    the preset they override)."""

    name: str
    task: str
    fixed: dict
    search: dict
    metric: str = OBJECTIVE
    mode: str = "max"
    num_samples: int = 4
    max_concurrent_trials: int = 1
    max_failures: int = 1
    seed: int = 0
    startup_trials: int | None = None  # random trials before TPE models the space (default: num_samples // 2)
    points_to_evaluate: tuple = ()
    trial_resources: Resources = field(default_factory=Resources)
    asha: AshaConfig | None = field(default_factory=AshaConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    mlflow: dict = field(default_factory=dict)
    storage: str | None = None
    tune_storage: str | None = None  # Ray Tune storage_path when not <storage>/tune (s3://, gs://, NFS)
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise DilmError(f"sweep name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        for key, cls in (("trial_resources", Resources), ("asha", AshaConfig), ("eval", EvalSpec)):
            value = getattr(self, key)
            if isinstance(value, dict) or (value is None and key != "asha"):
                object.__setattr__(self, key, _build(cls, value, key))
        if not isinstance(self.search, dict) or not isinstance(self.fixed, dict):
            raise DilmError("'fixed' and 'search' must be mappings of DistillConfig options")
        object.__setattr__(self, "search", {k: v if isinstance(v, SearchParam) else
                                            _build(SearchParam, {"name": k, **(v or {})}, f"search.{k}")
                                            for k, v in self.search.items()})
        for key in ("num_samples", "max_concurrent_trials", "max_failures", "seed"):
            object.__setattr__(self, key, _number(getattr(self, key), key, int))
        if self.num_samples < 1 or self.max_concurrent_trials < 1 or self.max_failures < 0:
            raise DilmError("num_samples and max_concurrent_trials must be >= 1, max_failures >= 0")
        if self.metric != OBJECTIVE or self.mode != "max":
            raise DilmError(f"metric/mode must be {OBJECTIVE}/max (mean accuracy over the pool's architectures and "
                            f"DPCs), got {self.metric}/{self.mode}")
        if self.storage and "://" in str(self.storage):
            raise DilmError(f"storage must be a local folder (a shared mount for multi-node sweeps), got "
                            f"{self.storage!r}; put s3:// or gs:// URIs in tune_storage (--tune-storage)")
        unknown = sorted(set(self.mlflow) - {"experiment"})
        if unknown:
            raise DilmError(f"mlflow: unknown key(s) {unknown}; known keys: experiment")
        object.__setattr__(self, "points_to_evaluate", tuple(dict(p) for p in self.points_to_evaluate or ()))
        self._check_distill_keys()

    def _check_distill_keys(self) -> None:
        if "preset" not in self.fixed:
            raise DilmError(f"fixed.preset is required ({', '.join(PRESETS)})")
        reserved = sorted({"task", "output_dir"} & (set(self.fixed) | set(self.search)))
        if reserved:
            raise DilmError(f"{reserved} are set by the sweep (top-level 'task'; one output folder per trial)")
        known = {f.name for f in dataclasses.fields(DistillConfig)}
        unknown = sorted(set(self.search) - known)
        if unknown:
            raise DilmError(f"search: unknown distill option(s) {unknown}")
        for i, point in enumerate(self.points_to_evaluate):
            if set(point) != set(self.search):
                raise DilmError(f"points_to_evaluate[{i}] must give every search key {sorted(self.search)}, "
                                f"got {sorted(point)}")
        cfg = DistillConfig.from_preset(self.preset, **self.distill_fixed(), task=self.task)  # fails fast
        if cfg.device.startswith("cuda") and not self.trial_resources.gpu:
            raise DilmError(f"fixed.device is {cfg.device!r} but trial_resources has no GPU share")
        self._check_asha_horizon(cfg)

    def _check_asha_horizon(self, cfg: DistillConfig) -> None:
        """ASHA stops a trial whose ``time_attr`` reaches ``max_t``: that must not happen before the final report."""
        if self.asha is None:
            return
        if self.asha.time_attr == "training_iteration":
            depends = {"outer_loops", "val_interval"}
            reach = cfg.outer_loops // cfg.val_interval if cfg.val_interval else 0  # validation reports
        else:
            depends, reach = {"outer_loops", "inner_loop", "lm_steps"}, cfg.lm_steps + cfg.total_match_steps
        if not depends & set(self.search) and reach >= self.asha.max_t:
            raise DilmError(f"asha.max_t ({self.asha.max_t}) must exceed the {reach} ({self.asha.time_attr}) a full "
                            "trial reaches, or ASHA stops every trial before its final report")

    @property
    def preset(self) -> str:
        return self.fixed["preset"]

    def distill_fixed(self) -> dict:
        return {k: v for k, v in self.fixed.items() if k != "preset"}

    @property
    def experiment(self) -> str:
        return self.mlflow.get("experiment") or f"dilm-{self.name}"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["search"] = {k: {f: v for f, v in dataclasses.asdict(p).items() if v not in (None, False) and f != "name"}
                         for k, p in self.search.items()}
        return out


SMOKE = {  # --smoke: the same search space on tiny models, a few trials, CPU only (seconds per trial)
    "num_samples": 3, "max_concurrent_trials": 2, "max_failures": 1, "startup_trials": 1,
    "trial_resources": {"cpu": 1, "gpu": 0},
    "asha": {"time_attr": "training_iteration", "max_t": 100, "grace_period": 1, "reduction_factor": 2},
    "eval": {"archs": ["tfidf-logreg", "tiny-bert"], "seeds": 1, "steps": 10, "test_limit": 100, "device": "cpu",
             "actors": 1, "actor_resources": {"cpu": 0, "gpu": 0}},
}


def load_config(path: str | Path, smoke: bool = False, name: str | None = None, storage: str | Path | None = None,
                tune_storage: str | None = None) -> SweepConfig:
    """Read a sweep YAML; ``smoke`` swaps in tiny models, CPU and a few trials (name suffixed ``-smoke``)."""
    path = Path(path)
    if not path.exists():
        raise DilmError(f"sweep config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DilmError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise DilmError(f"{path}: a sweep config is a mapping")
    if smoke:
        raw = {**raw, **SMOKE, "fixed": {"preset": "smoke", "device": "cpu"},
               "name": f"{raw.get('name', path.stem)}-smoke", "points_to_evaluate": []}
    raw.setdefault("name", path.stem)
    if name:
        raw["name"] = name
    if storage:
        raw["storage"] = str(storage)
    if tune_storage:
        raw["tune_storage"] = tune_storage
    try:
        return _build(SweepConfig, raw, str(path))
    except DilmError as e:
        raise DilmError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- storage layout


@dataclass(frozen=True)
class SweepPaths:
    storage: Path
    name: str
    tune_storage: str

    @classmethod
    def of(cls, cfg: SweepConfig) -> SweepPaths:
        storage = Path(cfg.storage).expanduser().resolve() if cfg.storage else default_storage()
        return cls(storage, cfg.name, cfg.tune_storage or str(storage / "tune"))

    @property
    def tune_dir(self) -> str:
        return f"{self.tune_storage.rstrip('/')}/{self.name}"

    @property
    def sets_dir(self) -> Path:
        return self.storage / "sets" / self.name

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.storage / 'optuna.db'}"

    @property
    def state_file(self) -> Path:
        return self.storage / "state" / f"{self.name}.json"

    @property
    def reports_dir(self) -> Path:
        return self.storage / "reports" / self.name


# --------------------------------------------------------------------------- resources


def check_resources(cfg: SweepConfig, cluster: dict) -> list[str]:
    """Fail fast (DilmError) when the pool plus one trial can never fit in ``cluster`` (``ray.cluster_resources()``);
    return warnings when fewer than ``max_concurrent_trials`` fit. Arithmetic: see :mod:`tune.pool`."""
    cpu, gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    actors, a, t = cfg.eval.actors, cfg.eval.actor_resources, cfg.trial_resources
    pool_cpu, pool_gpu = actors * a.cpu, actors * a.gpu
    have = f"the Ray cluster has {cpu:g} CPU and {gpu:g} GPU"
    if (t.gpu or pool_gpu) and not gpu:
        raise DilmError(f"the sweep asks for GPUs (trial {t.gpu:g}, pool {pool_gpu:g}) but {have}; "
                        "use --smoke or a CPU config such as sweeps/demo.yaml")
    if pool_cpu + t.cpu > cpu + 1e-9 or pool_gpu + t.gpu > gpu + 1e-9:
        raise DilmError(f"the pool ({actors} x {a.cpu:g} CPU, {a.gpu:g} GPU) plus one trial ({t.cpu:g} CPU, "
                        f"{t.gpu:g} GPU) do not fit: {have}")
    fit = [(cpu - pool_cpu) / t.cpu if t.cpu else math.inf, (gpu - pool_gpu) / t.gpu if t.gpu else math.inf]
    concurrent = int(min(fit) + 1e-9)
    if concurrent < cfg.max_concurrent_trials:
        return [f"only {concurrent} of max_concurrent_trials={cfg.max_concurrent_trials} trials fit beside the "
                f"evaluation pool ({have}); Tune will run {concurrent} at a time"]
    return []


# --------------------------------------------------------------------------- the trial


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its sampled values (picklable; given by ``tune.with_parameters``)."""

    task: str
    preset: str
    fixed: dict
    sets_dir: str
    tune_dir: str
    pool: PoolSpec
    tracking: TrackingSpec
    cpu: float


class StepLogger:
    """distill's callback: every step's metrics to MLflow; every validation also to Tune (ASHA's signal)."""

    def __init__(self, run):
        self.run = run

    def __call__(self, metrics: dict) -> None:
        step = int(metrics.get("step", 0))
        self.run.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if VAL_METRIC in metrics:
            self.run.flush()  # a trial stopped by ASHA at this report keeps its metrics
            report({OBJECTIVE: math.nan, VAL_METRIC: float(metrics[VAL_METRIC]), "step": step, FINAL: False})


def score_on_pool(sets: dict[int, list[Path]], task_name: str, pool) -> dict[int, dict[str, dict]]:
    """{dpc: [set paths]} → {dpc: {arch: summary}}, one pool job per DPC."""
    task = load_task(task_name)
    jobs = {dpc: [read_set(p, task.label_names, task.is_pair) for p in paths] for dpc, paths in sets.items()}
    return PoolClient(pool).score(jobs)


def final_result(scores: dict[int, dict[str, dict]], best_val: float | None, step: int) -> dict:
    """The trial's last report: objective = mean accuracy over architectures and DPCs, plus each architecture's
    mean over DPCs (``acc_<arch>``)."""
    archs = sorted({a for per in scores.values() for a in per})
    per_arch = {a: statistics.fmean(scores[d][a]["accuracy"] for d in scores if a in scores[d]) for a in archs}
    out = {OBJECTIVE: statistics.fmean(per_arch.values()),
           VAL_METRIC: math.nan if best_val is None else float(best_val), "step": step, FINAL: True}
    out.update({f"acc_{a}": v for a, v in per_arch.items()})
    return out


def score_metrics(scores: dict[int, dict[str, dict]]) -> dict[str, float]:
    """MLflow metric names for the final scores: ``accuracy/<arch>/dpc<d>`` and ``accuracy_std/...``."""
    out = {}
    for d, per in scores.items():
        for a, s in per.items():
            out[f"accuracy/{a}/dpc{d}"] = s["accuracy"]
            out[f"accuracy_std/{a}/dpc{d}"] = s["accuracy_std"]
    return out


def log_trial_outputs(run, result, scores: dict, final: dict, out: Path) -> None:
    write_json(out / "scores.json", {str(d): s for d, s in scores.items()})
    plots = accuracy_vs_dpc_all(scores, out / "plots", title=out.name)
    summary = {k: v for k, v in final.items() if k not in (FINAL, VAL_METRIC, "step")}  # objective, acc_<arch>
    run.log_metrics({**score_metrics(scores), **summary}, final["step"])
    run.flush()
    run.log_artifacts(out / "sets", "sets")
    run.log_artifact(result.provenance)
    run.log_artifact(out / "scores.json")
    for p in plots:
        run.log_artifact(p, "plots")


def run_trial(config: dict, plan: TrialPlan) -> None:
    """The Ray Tune trainable: distill with this trial's values, score the sets on the pool, report the objective."""
    ctx = get_context()
    trial_id = ctx.get_trial_id()
    out = Path(plan.sets_dir) / trial_id
    done = out / "final.json"
    if done.exists():  # finished before a driver crash: report again, do not run again
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # the crash may have come before the removal below
        report(json.loads(done.read_text()))
        return
    torch.set_num_threads(max(1, int(plan.cpu)))  # as Ray's OMP_NUM_THREADS: floor(cpu), at least 1
    with TrialRun(plan.tracking, trial_id, ctx.get_trial_name()) as run:
        run.set_tags({"dilm.output_dir": str(out), "dilm.tune_trial_dir": f"{plan.tune_dir}/{trial_id}"})
        run.log_params(config)  # the sampled values, logged even if the config turns out invalid
        cfg = DistillConfig.from_preset(plan.preset, **{**plan.fixed, **config}, task=plan.task, output_dir=str(out))
        run.log_params(cfg.to_dict())
        result = distill(cfg, callback=StepLogger(run))
        scores = score_on_pool(result.sets, plan.task, plan.pool)
        last_step = result.history[-1]["step"] if result.history else 0
        final = final_result(scores, result.best_val_accuracy, last_step)
        log_trial_outputs(run, result, scores, final, out)
        write_json(done, final)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # generator weights: only needed to resume this trial
    report(final)


def trial_dirname(trial) -> str:
    """Trial folders named by id: hyperparameters live in MLflow params, not in 200-character folder names."""
    return trial.trial_id


# --------------------------------------------------------------------------- the searcher and callbacks


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records early-stopped trials as PRUNED, with their validation accuracies as intermediate
    values (see the module docstring). Builds on OptunaSearch's attributes ``_ot_trials``, ``_ot_study`` and
    ``_completed_trials`` (Ray 2.60)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reported: dict[str, set[int]] = {}  # steps already given to trial.report, per trial

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        if params is not None:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return params

    def _report(self, trial_id: str, result: dict) -> None:
        value, step = result.get(VAL_METRIC), int(result.get("step", 0))
        done = self._reported.setdefault(trial_id, set())
        if value is None or not math.isfinite(value) or step in done:
            return
        self._ot_trials[trial_id].report(float(value), step)
        done.add(step)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials and not result.get(FINAL):
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = (result or {}).get(self.metric)
        if error:
            state, value = TrialState.FAIL, None
        elif result and result.get(FINAL) and value is not None and math.isfinite(value):
            state = TrialState.COMPLETE
        else:  # stopped by ASHA: Tune withholds the result it stopped on from on_trial_result
            state, value = TrialState.PRUNED, None
            self._report(trial_id, result or {})
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        except (ValueError, RuntimeError) as e:  # e.g. told already before a driver crash
            log.warning("optuna: trial %s: %s", trial_id, e)
        self._completed_trials.add(trial_id)


def make_searcher(cfg: SweepConfig, paths: SweepPaths) -> PruneAwareOptunaSearch:
    storage = optuna.storages.RDBStorage(paths.optuna_url)
    startup = cfg.startup_trials if cfg.startup_trials is not None else max(1, cfg.num_samples // 2)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)
    space = {k: p.distribution() for k, p in cfg.search.items()}
    return PruneAwareOptunaSearch(space, metric=OBJECTIVE, mode=cfg.mode, sampler=sampler, study_name=cfg.name,
                                  storage=storage, points_to_evaluate=list(cfg.points_to_evaluate) or None)


def make_scheduler(cfg: SweepConfig):
    if cfg.asha is None:
        return FIFOScheduler()
    a = cfg.asha
    return ASHAScheduler(time_attr=a.time_attr, metric=VAL_METRIC, mode="max", max_t=a.max_t,
                         grace_period=a.grace_period, reduction_factor=a.reduction_factor)


class TrialEnd(Callback):
    """Driver side, when a trial ends: the terminal status of its MLflow child run (a trial stopped by ASHA cannot set
    it), and for a trial stopped early the removal of its distill checkpoint (generator weights, never resumed)."""

    def __init__(self, spec: TrackingSpec, sets_dir: str):
        self.spec = spec
        self.sets_dir = sets_dir
        self._tracker = None

    def __getstate__(self):  # saved with the experiment: the MLflow client is rebuilt on demand
        return {**self.__dict__, "_tracker": None}

    def _end(self, trial, status: str, tags: dict | None = None) -> None:
        try:
            self._tracker = self._tracker or SweepTracker.attach(self.spec)
            self._tracker.end_child(trial.trial_id, status, tags)
        except Exception as e:  # tracking must not stop the sweep
            log.warning("mlflow: could not set trial %s to %s: %s", trial.trial_id, status, e)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get(FINAL):
            self._end(trial, "FINISHED")
        else:
            self._end(trial, "KILLED", {"dilm.stopped_early": "asha"})
            shutil.rmtree(Path(self.sets_dir) / trial.trial_id / "checkpoint", ignore_errors=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")


# --------------------------------------------------------------------------- the driver


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Attach to a running cluster (``--address``, $RAY_ADDRESS, or one started by ``ray start``), else start a
    local one without the dashboard. Inside ``ray job submit`` the job's cluster is used."""
    if ray.is_initialized():
        return
    local = address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))
    ray.init(address=address, include_dashboard=False, namespace="dilm",
             **({"num_cpus": num_cpus} if local and num_cpus else {}))


def _read_state(paths: SweepPaths) -> dict:
    return json.loads(paths.state_file.read_text()) if paths.state_file.exists() else {}


def _study_exists(paths: SweepPaths, name: str) -> bool:
    if not (paths.storage / "optuna.db").exists():
        return False
    return name in optuna.study.get_all_study_names(optuna.storages.RDBStorage(paths.optuna_url))


def check_same_config(cfg: SweepConfig, paths: SweepPaths) -> None:
    """A resumed sweep keeps its search space and schedule (restored by Tune): refuse a YAML that now differs
    (``storage`` and ``description`` aside: where the sweep lives and free text)."""
    saved = _read_state(paths).get("config") or {}
    now = json.loads(json.dumps(cfg.to_dict(), default=str))  # as saved: tuples become lists
    changed = sorted(k for k in set(saved) | set(now) if saved and k not in ("storage", "description")
                     and saved.get(k) != now.get(k))
    if changed:
        raise DilmError(f"sweep {cfg.name!r} was started with a different configuration ({', '.join(changed)} "
                        "changed): resume it with the same YAML, or start another with --name")


def start_tracking(cfg: SweepConfig, paths: SweepPaths, resume: bool) -> SweepTracker:
    state = _read_state(paths) if resume else {}
    uri = tracking_uri(paths.storage)
    same_store = state.get("tracking_uri") == uri
    tracker = SweepTracker.start(uri, cfg.experiment, cfg.name,
                                 parent_run_id=state.get("parent_run_id") if same_store else None,
                                 tags={"dilm.storage": str(paths.storage), "mlflow.note.content": cfg.description})
    write_json(paths.state_file, {"parent_run_id": tracker.spec.parent_run_id, "tracking_uri": uri,
                                  "experiment_id": tracker.spec.experiment_id, "config": cfg.to_dict()})
    tracker.log_params(flatten(cfg.to_dict()))
    return tracker


def build_tuner(cfg: SweepConfig, paths: SweepPaths, plan: TrialPlan, restore: bool) -> Tuner:
    trainable = with_resources(with_parameters(run_trial, plan=plan), cfg.trial_resources.as_tune())
    if restore:  # search algorithm, scheduler and callbacks come back from the experiment's saved state
        return Tuner.restore(paths.tune_dir, trainable=trainable, resume_errored=True)
    tune_config = TuneConfig(search_alg=make_searcher(cfg, paths), scheduler=make_scheduler(cfg),
                             num_samples=cfg.num_samples, max_concurrent_trials=cfg.max_concurrent_trials,
                             trial_dirname_creator=trial_dirname)
    run_config = RunConfig(name=cfg.name, storage_path=paths.tune_storage,
                           failure_config=FailureConfig(max_failures=cfg.max_failures),
                           callbacks=[TrialEnd(plan.tracking, plan.sets_dir)])
    return Tuner(trainable, tune_config=tune_config, run_config=run_config)


def run_sweep(cfg: SweepConfig, resume: bool = False, address: str | None = None, num_cpus: int | None = None,
              resource_check: bool = True) -> dict:
    """Run (or, with ``resume``, continue) a sweep; returns the summary (see :func:`summarize`)."""
    paths = SweepPaths.of(cfg)
    restore = Tuner.can_restore(paths.tune_dir)
    if not resume and (restore or _study_exists(paths, cfg.name)):
        raise DilmError(f"sweep {cfg.name!r} already exists in {paths.storage}: pass --resume to continue it, "
                        "or --name to start another")
    if resume:
        check_same_config(cfg, paths)
    connect_ray(address, num_cpus)
    if resource_check:
        for warning in check_resources(cfg, ray.cluster_resources()):
            print(f"warning: {warning}", file=sys.stderr)
    tracker = start_tracking(cfg, paths, resume)
    status, handles = "FAILED", []
    try:
        pool, handles = create_pool(cfg.task, cfg.eval.eval_config(), actors=cfg.eval.actors,
                                    cpu=cfg.eval.actor_resources.cpu, gpu=cfg.eval.actor_resources.gpu,
                                    max_restarts=cfg.eval.max_restarts, retries=cfg.eval.retries,
                                    prefix=f"{cfg.name}-{os.getpid()}-{int(time.time())}",
                                    start_timeout_s=300 if resource_check else 3600)  # autoscaling: nodes boot
        plan = TrialPlan(cfg.task, cfg.preset, cfg.distill_fixed(), str(paths.sets_dir), paths.tune_dir, pool,
                         tracker.spec, cfg.trial_resources.cpu)
        results = build_tuner(cfg, paths, plan, restore).fit()
        finished = results.num_terminated + results.num_errors == len(results) >= cfg.num_samples
        study = _load_study(cfg, paths)
        if finished:
            fail_orphans(study)
        summary = summarize(study, cfg, paths, finished)
        report_summary(tracker, summary, paths)
        status = "FINISHED" if summary["finished"] else "KILLED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        shutdown_pool(handles)
        tracker.end(status)


# --------------------------------------------------------------------------- summary


def _load_study(cfg: SweepConfig, paths: SweepPaths) -> optuna.Study:
    return optuna.load_study(study_name=cfg.name, storage=optuna.storages.RDBStorage(paths.optuna_url))


def param_importances(study) -> dict[str, float] | None:
    """fANOVA importances over the study's COMPLETE trials; None when they cannot be computed (too few trials, or
    a parameter that never varied)."""
    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as e:
        log.info("no parameter importances: %s", e)
        return None


def fail_orphans(study) -> int:
    """Once a sweep has finished no trial runs: an Optuna trial still RUNNING was asked by a driver killed before Tune
    saved its searcher state (the restored sweep suggested a new trial instead). Mark those FAIL."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in orphans:
        study.tell(t.number, state=TrialState.FAIL)
    return len(orphans)


def summarize(study, cfg: SweepConfig, paths: SweepPaths, finished: bool) -> dict:
    """The per-trial table (from the Optuna study), counts and the best trial."""
    rows = [{"number": t.number, "ray_trial_id": t.user_attrs.get("ray_trial_id", ""), "state": t.state.name,
             OBJECTIVE: t.value if t.state.name == "COMPLETE" else None, **t.params}
            for t in study.trials]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: r[OBJECTIVE]) if complete else None
    states = [r["state"] for r in rows]
    return {"name": cfg.name, "rows": rows, "best": best, "complete": len(complete),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"), "finished": finished,
            "importances": param_importances(study) if len(complete) >= 2 else None,
            "storage": str(paths.storage), "optuna_url": paths.optuna_url}


def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def report_summary(tracker, summary: dict, paths: SweepPaths) -> None:
    """Parent run: counts, best objective, trials.csv and the parameter-importance plot; then a console summary."""
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
    if summary["importances"]:
        write_json(out / "param_importances.json", summary["importances"])
        tracker.log_artifact(plot_importances(summary["importances"], out / "param_importances.png",
                                              f"{summary['name']}: importance for the objective"))
        tracker.log_artifact(out / "param_importances.json")
    print(format_summary(summary))


def format_summary(s: dict) -> str:
    lines = [f"sweep {s['name']}: {s['complete']} complete, {s['pruned']} stopped early (ASHA), "
             f"{s['failed']} failed" + ("" if s["finished"] else " — interrupted: continue with --resume")]
    if s["best"]:
        params = {k: v for k, v in s["best"].items() if k not in ("number", "ray_trial_id", "state", OBJECTIVE)}
        lines.append(f"  best objective {s['best'][OBJECTIVE]:.2f} (trial {s['best']['ray_trial_id']}): {params}")
        lines.append(f"  its sets:  {Path(s['storage']) / 'sets' / s['name'] / s['best']['ray_trial_id'] / 'sets'}")
    if s["importances"]:
        lines.append("  importance: " + ", ".join(f"{k} {v:.2f}" for k, v in s["importances"].items()))
    lines.append(f"  MLflow:    dilm ui --storage {s['storage']}")
    lines.append(f"  Optuna:    optuna-dashboard {s['optuna_url']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dilm sweep", description="Ray Tune + Optuna sweep of DiLM distillation, "
                                "tracked in MLflow")
    p.add_argument("--config", required=True, type=Path, help="sweep YAML (sweeps/demo.yaml, sweeps/sst2.yaml, ...)")
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 trials, CPU: check the plumbing in minutes")
    p.add_argument("--resume", action="store_true", help="continue the sweep of this name (start it if new)")
    p.add_argument("--name", help="sweep name (default: the YAML's name)")
    p.add_argument("--storage", help="local state folder (default: the YAML's storage, $DILM_SWEEP_DIR or "
                   "./runs/sweeps)")
    p.add_argument("--tune-storage", help="Ray Tune experiment location if not <storage>/tune: s3://, gs:// or a "
                   "shared mount, for multi-node sweeps")
    p.add_argument("--address", help="Ray cluster address; 'local' starts a private one (default: $RAY_ADDRESS, a "
                   "cluster started by `ray start`, else a new local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a newly started local cluster")
    p.add_argument("--autoscaling", action="store_true", help="the cluster adds nodes on demand: skip the check that "
                   "trials fit in the resources present now")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, smoke=args.smoke, name=args.name, storage=args.storage,
                          tune_storage=args.tune_storage)
        summary = run_sweep(cfg, resume=args.resume, address=args.address, num_cpus=args.num_cpus,
                            resource_check=not args.autoscaling)
    except (DilmError, PoolError) as e:
        print(f"dilm sweep: error: {e}", file=sys.stderr)
        return 2
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
