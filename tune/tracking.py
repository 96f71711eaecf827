"""MLflow tracking of sweeps: the runs a sweep and its trials log to (``dilm ui`` shows them: :mod:`tune.ui`).

Runs: one **parent run** per sweep (created by the driver; the sweep's configuration, summary metrics, the trials
table and the parameter-importance plot) and one **child run** per trial (tag ``mlflow.parentRunId``; every
``DistillConfig`` key as a param, per-step metrics, final accuracies per architecture and DPC, the JSONL sets, the
provenance file and the accuracy-vs-DPC plots). A trial that is retried or restarted after a driver crash finds
its child run again by the tag ``dilm.trial_id`` and continues it; the driver sets the terminal status (FINISHED,
KILLED for trials stopped early, FAILED) because a trial stopped by the scheduler cannot.

Where things go: the tracking URI is ``$MLFLOW_TRACKING_URI`` when set (an ``http://`` server for multi-node
sweeps: trials on other machines cannot reach a local file), else ``sqlite:////<storage>/mlflow.db``. With a sqlite
store the artifacts of experiment E go to ``<db folder>/mlartifacts/E`` (absolute, so trials whose working directory
is under ``/tmp/ray`` write to the same place); with a server, the server decides. Each sweep's runs page (trials as
rows, with metrics: :func:`sweep_view`) is saved with its experiment; ``dilm ui`` (:mod:`tune.ui`) serves the store
and prints the pages' links.

Per-step metrics are buffered and written in batches (``log_batch``): a sqlite write per step and key would slow the
trials and contend for the database lock.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tune.scores import OBJECTIVE, RIVALS

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "dilm.trial_id"
SWEEP_TAG = "dilm.sweep"
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
BEST_TAG = "dilm.best"
BEST_MARK = "★ best"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI
# A runs-page view the UI opens from the URL (``?viewStateShareKey=KEY``): the experiment tag VIEW_TAG + KEY holds its
# JSON (search filter, order, columns: what MLflow's "share view" button saves). KEY is the sweep's parent run id.
VIEW_TAG = "mlflow.sharedViewState."
VIEW_METRICS = (OBJECTIVE, *(f"vs_{b}" for b in RIVALS))  # a trial's objective − each baseline's



def default_storage() -> Path:
    """Where sweeps keep their state when neither ``--storage`` nor the YAML says: ``$DILM_SWEEP_DIR`` or
    ``./runs/sweeps``, as given (a relative one is relative to the working directory)."""
    return Path(os.environ.get("DILM_SWEEP_DIR", "runs/sweeps")).expanduser()


def tracking_uri(storage: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(storage).expanduser().resolve() / 'mlflow.db'}"  # sqlite:////abs/path/mlflow.db


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Absolute ``file://`` artifact folder beside a sqlite store; ``None`` (the server's choice) otherwise."""
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment)
    return (db.parent / "mlartifacts" / safe).as_uri()


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (params of the parent run)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _param_value(v) -> str:
    return str(list(v) if isinstance(v, tuple) else v)[:6000]


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class TrackingSpec:
    """What a trial needs to log into its sweep (picklable)."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str


def _log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    items = [Param(str(k), _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i: i + MAX_PARAMS_PER_BATCH])


def _log_metrics(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i: i + MAX_METRICS_PER_BATCH])


class SweepTracker:
    """Driver side: the parent run of one sweep, and the terminal status of its children."""

    def __init__(self, client: MlflowClient, spec: TrackingSpec):
        self.client = client
        self.spec = spec

    @classmethod
    def start(cls, uri: str, experiment: str, sweep: str, parent_run_id: str | None = None,
              tags: dict | None = None) -> SweepTracker:
        """Open the sweep's parent run: a new one, or ``parent_run_id`` again when a sweep resumes."""
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            experiment, artifact_location=artifact_location(uri, experiment))
        # MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view: runs table with metrics instead
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        if parent_run_id:
            client.update_run(parent_run_id, status="RUNNING")
        else:
            run = client.create_run(exp_id, run_name=sweep, tags={SWEEP_TAG: sweep, **(tags or {})})
            parent_run_id = run.info.run_id
        tracker = cls(client, TrackingSpec(uri, exp_id, parent_run_id, sweep))
        tracker.set_view()
        return tracker

    @classmethod
    def attach(cls, spec: TrackingSpec) -> SweepTracker:
        """The tracker of a running sweep, from its spec (driver callbacks restored after a crash)."""
        return cls(MlflowClient(tracking_uri=spec.uri), spec)

    def log_params(self, params: dict) -> None:
        known = self.client.get_run(self.spec.parent_run_id).data.params
        _log_params(self.client, self.spec.parent_run_id, {k: v for k, v in params.items() if k not in known})

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.spec.parent_run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict) -> None:
        ts = _now_ms()
        _log_metrics(self.client, self.spec.parent_run_id,
                     [Metric(k, v, ts, 0) for k, v in _numeric(metrics).items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.spec.parent_run_id, str(path), artifact_path)

    def child_runs(self) -> list:
        return self.client.search_runs([self.spec.experiment_id],
                                       filter_string=f"tags.`{PARENT_TAG}` = '{self.spec.parent_run_id}'",
                                       max_results=10000)

    def find_child(self, trial_id: str):
        return find_child(self.client, self.spec, trial_id)

    def end_child(self, trial_id: str, status: str, tags: dict | None = None) -> None:
        """Set a trial's terminal status (``FINISHED``, ``KILLED`` or ``FAILED``) if its child run exists."""
        run = self.find_child(trial_id)
        if run is None:
            return
        if tags:
            self.client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run.info.run_id, status=status)

    def log_child_metrics(self, trial_id: str, metrics: dict) -> None:
        """Metrics of a trial's child run, if it exists (the summary's margins over the baselines)."""
        if (run := self.find_child(trial_id)) is not None:
            ts = _now_ms()
            _log_metrics(self.client, run.info.run_id, [Metric(k, v, ts, 0) for k, v in _numeric(metrics).items()])

    def mark_best(self, trial_id: str, headline: str) -> None:
        """The winning trial's child run, visible without picking columns: its name starts with ``★ best``, it is
        tagged ``dilm.best``, and ``headline`` (how much it beat the baselines by) is its description."""
        run = self.find_child(trial_id)
        if run is None:
            return
        name = run.info.run_name or trial_id
        tags = [RunTag(BEST_TAG, "true"), RunTag(NOTE_TAG, headline)]
        if not name.startswith(BEST_MARK):
            tags.append(RunTag("mlflow.runName", f"{BEST_MARK} {name}"))
        self.client.log_batch(run.info.run_id, tags=tags)

    def set_view(self, params: list[str] | tuple[str, ...] = ()) -> None:
        """The sweep's runs page (:func:`sweep_view`, ``params`` as columns), opened by :func:`tune.ui.view_url`."""
        self.client.set_experiment_tag(self.spec.experiment_id, VIEW_TAG + self.spec.parent_run_id,
                                       json.dumps(sweep_view(self.spec.parent_run_id, params)))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.spec.parent_run_id, status=status)


def find_child(client: MlflowClient, spec: TrackingSpec, trial_id: str):
    runs = client.search_runs([spec.experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{spec.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"), max_results=1)
    return runs[0] if runs else None


class TrialRun:
    """Trial side: the child run of one trial. A context manager: an exception marks the run FAILED (and
    propagates), ``KeyboardInterrupt`` or another exit KILLED, a normal exit FINISHED; when Tune stops the trial
    (``SystemExit(0)``) the driver sets it (:class:`tune.search.TrialEnd`)."""

    FLUSH_EVERY_S = 5.0
    FLUSH_EVERY_N = 200

    def __init__(self, spec: TrackingSpec, trial_id: str, trial_name: str = ""):
        self.client = MlflowClient(tracking_uri=spec.uri)
        self.spec = spec
        existing = find_child(self.client, spec, trial_id)
        if existing is not None:  # a retried or restored trial continues its run
            self.run_id = existing.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {PARENT_TAG: spec.parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: spec.sweep}
            self.run_id = self.client.create_run(spec.experiment_id, run_name=trial_name or trial_id,
                                                 tags=tags).info.run_id
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()

    def __enter__(self) -> TrialRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.flush()
        if isinstance(exc, SystemExit) and exc.code == 0:  # Tune stopped it: the driver's TrialEnd sets the status
            return
        if exc is None:
            status = "FINISHED"
        elif isinstance(exc, Exception):
            status = "FAILED"
            self.set_tags({"dilm.error": f"{exc_type.__name__}: {exc}"[:5000]})
        else:
            status = "KILLED"
        self.client.set_terminated(self.run_id, status=status)

    def log_params(self, params: dict) -> None:
        known = self.client.get_run(self.run_id).data.params  # params are immutable: a resumed run skips them
        _log_params(self.client, self.run_id, {k: v for k, v in params.items() if k not in known})

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        ts = _now_ms()
        self._buffer += [Metric(k, v, ts, int(step)) for k, v in _numeric(metrics).items()]
        if len(self._buffer) >= self.FLUSH_EVERY_N or time.monotonic() - self._last_flush >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            _log_metrics(self.client, self.run_id, self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def rename(self, name: str) -> None:
        self.client.set_tag(self.run_id, "mlflow.runName", name)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def run_label(trial_id: str, values: dict, objective: float | None = None) -> str:
    """A child run's name that reads at a glance in the runs table: short trial id, objective, searched values
    (``00003 obj 61.2 | generator_lr=3.2e-05 inner_loop=2``)."""
    short = trial_id.rsplit("_", 1)[-1]
    vals = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))
    return f"{short} " + ("" if objective is None else f"obj {objective:.1f} | ") + vals


def sweep_view(parent_run_id: str, params: list[str] | tuple[str, ...] = ()) -> dict:
    """A runs-page view of one sweep (MLflow 3.17's UI-state keys): its trials and baselines as rows (the parent's
    children: the parent itself would fold them away), best objective first, the objective, the margins over the
    baselines and the searched values as columns."""
    return {"searchFilter": f"tags.`{PARENT_TAG}` = '{parent_run_id}'", "orderByKey": f"metrics.`{OBJECTIVE}`",
            "orderByAsc": False, "selectedColumns": [f"metrics.`{m}`" for m in VIEW_METRICS]
            + [f"params.`{p}`" for p in params]}
