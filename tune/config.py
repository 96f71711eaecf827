"""The sweep YAML schema: :class:`SweepConfig` and its parts.

A sweep YAML (``sweeps/*.yaml``) is data: ``fixed`` DistillConfig values (``fixed.preset`` picks the preset they
override), a ``search`` space (``{type: loguniform|uniform|int|categorical, ...}`` per DistillConfig key), budgets
(``num_samples``, ``max_concurrent_trials``, ``asha``), resources (``trial_resources``, ``baseline_resources``, the
``eval`` pool's actors)
and tracking (``mlflow.experiment``). Every part is a frozen dataclass validated when built: a bad key or value is a
one-line :class:`~dilm.DilmError` naming it, raised before Ray starts.

The sweep always maximises ``objective``, the mean test accuracy (%) over the evaluation pool's architectures and
the DPCs (:func:`tune.scores.objective`); ``metric``/``mode`` keys of older YAMLs are refused with that message.

Where a sweep keeps its state (``--storage``: a folder or a URI) is :class:`tune.paths.SweepPaths`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml

from dilm import DilmError
from dilm.archs import check_archs
from dilm.distill import PRESETS, DistillConfig
from dilm.distill.config import MODEL_KEYS
from dilm.models import check_model
from dilm.protocol import EvalConfig
from dilm.tasks import TASKS, TaskSpec, resolve_task, spec_from_mapping
from tune.database import check_url, masked
from tune.paths import SweepPaths, in_ray_job, local_folder  # noqa: F401 (importable from here, as before)
from tune.scores import OBJECTIVE
from tune.storage import check_location

SEARCH_TYPES = ("loguniform", "uniform", "int", "categorical")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RETIRED_KEYS = ("metric", "mode")  # in YAMLs (and saved configurations) before the objective was fixed
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
    """A Ray resource share: logical CPUs, a GPU fraction and custom resources (``{worker: 1}`` asks for nodes
    started with ``ray start --resources '{"worker": N}'``)."""

    cpu: float = 1.0
    gpu: float = 0.0
    custom: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "cpu", _number(self.cpu, "cpu"))
        object.__setattr__(self, "gpu", _number(self.gpu, "gpu"))
        if self.cpu < 0 or self.gpu < 0:
            raise DilmError(f"resources must be >= 0, got cpu={self.cpu:g} gpu={self.gpu:g}")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise DilmError(f"a GPU share above 1 must be whole, got {self.gpu:g}")
        if not isinstance(self.custom, dict) or {"cpu", "gpu", "memory"} & {str(k).lower() for k in self.custom}:
            raise DilmError(f"custom resources must be a mapping of other names than cpu/gpu/memory, got "
                            f"{self.custom!r}")
        object.__setattr__(self, "custom", {str(k): _number(v, f"custom.{k}") for k, v in self.custom.items()})

    def as_tune(self) -> dict:
        return {"cpu": self.cpu, **({"gpu": self.gpu} if self.gpu else {}), **self.custom}

    def as_remote(self) -> dict:
        """``ray.remote`` options: a Ray task placed as a trial would be."""
        return {"num_cpus": self.cpu, "num_gpus": self.gpu, **({"resources": self.custom} if self.custom else {})}


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
class EvalSpec(EvalConfig):
    """The evaluation pool: every :class:`dilm.protocol.EvalConfig` field, with its default (the protocol has one
    source of defaults), plus the actors that run it. ``progress`` is off: actors log no progress bars."""

    actors: int = 1
    actor_resources: Resources = field(default_factory=Resources)
    objective_archs: tuple[str, ...] = ()  # the archs the sweep's objective averages (default: all of archs)
    max_restarts: int = 3
    retries: int = 3
    progress: bool = False

    def __post_init__(self):
        object.__setattr__(self, "archs", tuple(self.archs) if isinstance(self.archs, list | tuple) else (self.archs,))
        only = self.objective_archs
        object.__setattr__(self, "objective_archs", tuple(only) if isinstance(only, list | tuple) else (only,))
        if unknown := [a for a in self.objective_archs if a not in self.archs]:
            raise DilmError(f"eval.objective_archs names {', '.join(map(str, unknown))}, not among eval.archs "
                            f"({', '.join(self.archs)})")
        if isinstance(self.actor_resources, dict | None):
            object.__setattr__(self, "actor_resources", _build(Resources, self.actor_resources,
                                                               "eval.actor_resources"))
        for key in ("actors", "max_restarts", "retries"):
            object.__setattr__(self, key, _number(getattr(self, key), f"eval.{key}", int))
        if self.actors < 1 or self.max_restarts < 0 or self.retries < 0:
            raise DilmError("eval needs actors >= 1, max_restarts >= 0 and retries >= 0")
        check_archs(self.archs, "eval.archs")  # the models the actors will load, resolved as they will resolve them
        super().__post_init__()  # the EvalConfig checks, now rather than in an actor

    def eval_config(self) -> EvalConfig:
        """The protocol part, as the pool's actors take it."""
        return EvalConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EvalConfig) if f.init})


@dataclass(frozen=True)
class SweepConfig:
    """A sweep as read from YAML; ``fixed`` and ``search`` keys are DistillConfig options (``fixed.preset`` picks
    the preset they override)."""

    name: str
    task: TaskSpec  # a task reference in the YAML (tasks.resolve_task): a name, or a spec mapping
    fixed: dict
    search: dict
    num_samples: int = 4
    max_concurrent_trials: int = 1
    max_failures: int = 1
    seed: int = 0
    startup_trials: int | None = None  # random trials before TPE models the space (default: num_samples // 2)
    points_to_evaluate: tuple = ()
    trial_resources: Resources = field(default_factory=Resources)
    baseline_resources: Resources | None = None  # the Ray task building a baseline's sets (None: a trial's share)
    asha: AshaConfig | None = field(default_factory=AshaConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    mlflow: dict = field(default_factory=dict)
    storage: str | None = None
    tune_storage: str | None = None  # Ray Tune storage_path when not <storage>/tune (s3://, gs://, NFS)
    tracking_db: str = ""  # MLflow's store and the Optuna study in this PostgreSQL database (tune.database)
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise DilmError(f"sweep name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        object.__setattr__(self, "task", resolve_task(self.task))
        for key, cls in (("trial_resources", Resources), ("baseline_resources", Resources), ("asha", AshaConfig),
                         ("eval", EvalSpec)):
            value = getattr(self, key)
            if isinstance(value, dict) or (value is None and key not in ("asha", "baseline_resources")):
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
        if self.storage:
            check_location(str(self.storage), "storage")
        if self.tracking_db:
            check_url(str(self.tracking_db))
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
        self._check_models()
        cfg = DistillConfig.from_preset(self.preset, **self.distill_fixed(), task=self.task)  # fails fast
        cfg.check_models(where=f"fixed.preset {self.preset}: ")  # the preset's models too (the YAML's: above)
        if cfg.device.startswith("cuda") and not self.trial_resources.gpu:
            raise DilmError(f"fixed.device is {cfg.device!r} but trial_resources has no GPU share")
        self._check_asha_horizon(cfg)

    def _check_models(self) -> None:
        """Every model name a trial will load that the YAML gives (``fixed`` values, a categorical's choices, the
        points to evaluate; the preset's are checked with the DistillConfig), resolved in the driver as the trial
        will resolve it: a miss is one line naming its YAML key."""
        for key in MODEL_KEYS:
            param = self.search.get(key)
            given = [(f"search.{key}", name) for name in (param.choices or ())] if param else [
                (f"fixed.{key}", self.fixed.get(key))]
            given += [(f"points_to_evaluate[{i}].{key}", p.get(key)) for i, p in enumerate(self.points_to_evaluate)]
            for where, name in given:
                if name:
                    check_model(str(name), where)

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

    @classmethod
    def from_dict(cls, raw: dict) -> SweepConfig:
        """Build from a YAML mapping (or a saved :meth:`to_dict`); one-line DilmError on a bad key or value."""
        retired = [k for k in RETIRED_KEYS if isinstance(raw, dict) and k in raw]
        if retired:
            raise DilmError(f"{'/'.join(retired)} can no longer be set: a sweep always maximises "
                            f"{OBJECTIVE!r} (mean accuracy over the pool's architectures and DPCs); delete the key(s)")
        return _build(cls, raw, "top level")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["task"] = self.task.to_ref()
        out["tracking_db"] = masked(self.tracking_db) if self.tracking_db else ""  # saved, logged: no password
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


def task_beside(task, folder: Path, name: str = ""):
    """A YAML's task with its relative paths taken from the YAML's folder (a spec mapping's files, a spec file or a
    saved dataset named by path), so that a sweep reads the same data from whatever directory it is started in; a
    mapping without a ``name`` takes ``name`` (the sweep's)."""
    try:
        if isinstance(task, dict):
            return spec_from_mapping({"name": name, **task}, folder, "task")
        if isinstance(task, str) and task not in TASKS and not task.startswith("hf:") and (folder / task).exists():
            return resolve_task(str(folder / task))
    except DilmError as e:
        raise DilmError(f"task: {e}") from None
    return task


def load_config(path: str | Path, smoke: bool = False, name: str | None = None, storage: str | Path | None = None,
                tune_storage: str | None = None, tracking_db: str | None = None) -> SweepConfig:
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
    if "task" in raw:
        raw["task"] = task_beside(raw["task"], path.parent, str(raw["name"]))
    if name:
        raw["name"] = name
    if storage:
        raw["storage"] = str(storage)
    if tune_storage:
        raw["tune_storage"] = tune_storage
    if tracking_db:
        raw["tracking_db"] = tracking_db
    try:
        return SweepConfig.from_dict(raw)
    except DilmError as e:
        raise DilmError(f"{path}: {e}") from None
