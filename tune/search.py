"""The Optuna/ASHA adapters and the Tune callback: everything here leans on Ray Tune's internals (Ray 2.60).

ASHA and Optuna. ``OptunaSearch`` has no pruner of its own and stores a trial that ASHA stopped as COMPLETE with its
last reported value — here a validation accuracy or nothing, not an objective. :class:`PruneAwareOptunaSearch`
tells the study the truth instead: intermediate ``val_accuracy`` values go to ``trial.report`` (visible in
optuna-dashboard, and used by TPE to rank pruned trials), a trial whose last result carries ``final: True`` is
COMPLETE with its objective, an errored trial FAIL, and any other (stopped early) trial PRUNED — so TPE fits its
"good" density on real objectives only and the parameter importances use complete trials only. Intermediate
reports carry ``objective: nan`` (every result must hold the searcher's metric), never a stand-in value; Optuna
itself shows a pruned trial's last intermediate value as its value, labelled PRUNED.

Ray internals used: OptunaSearch's private ``_ot_trials``, ``_ot_study`` and ``_completed_trials``; Tune's
``Trial`` objects (``trial_id``, ``last_result``) handed to callbacks and to ``trial_dirname_creator``. Optuna
internals used (Optuna 5): a ``Trial``'s ``_trial_id`` and ``_cached_frozen_trial`` (its parameters and
distributions), to ask again a trial missing from a restored study.

Pickled state: Tune saves the searcher, the callback and ``trial_dirname`` with the experiment (by qualified name),
and ``--resume`` loads them back; renaming or moving them breaks resuming sweeps started before (see the names kept
importable in :mod:`tune.sweep`). The searcher's pickles hold Optuna's ``RDBStorage``, whose unpickling connects to
the URL it was saved with: an absolute sqlite path of the first head's folder, which a fresh head may keep elsewhere
(another ``$DILM_CACHE``). :func:`optuna_storage_at` points every storage unpickled while restoring at this run's.
"""

from __future__ import annotations

import contextlib
import logging
import math

import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from tune.config import SweepConfig, SweepPaths
from tune.database import DatabaseDown, gone, study_storage
from tune.scores import FINAL, MODE, OBJECTIVE, VAL_METRIC
from tune.storage import open_storage
from tune.tracking import TRIAL_TAG, SweepTracker, TrackingSpec

log = logging.getLogger("tune.search")


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records early-stopped trials as PRUNED, with their validation accuracies as intermediate
    values (see the module docstring). Builds on OptunaSearch's attributes ``_ot_trials``, ``_ot_study`` and
    ``_completed_trials`` (Ray 2.60)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reported: dict[str, set[int]] = {}  # steps already given to trial.report, per trial

    def suggest(self, trial_id: str) -> dict | None:
        try:
            params = super().suggest(trial_id)
            if params is not None:
                self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        except DatabaseDown:  # no trial: Tune's loop ends after this step (TrialEnd.on_step_end)
            return None
        return params

    def _report(self, trial_id: str, result: dict) -> None:
        value, step = result.get(VAL_METRIC), int(result.get("step", 0))
        done = self._reported.setdefault(trial_id, set())
        if value is None or not math.isfinite(value) or step in done:
            return
        self._ot_trials[trial_id].report(float(value), step)
        done.add(step)

    def restore(self, checkpoint_path: str) -> None:
        """The searcher state Tune saved (the study, its trials), on this run's storage: ``self`` came from the
        experiment's ``tuner.pkl`` already pointed at it (``tune.sweep.build_tuner``)."""
        with optuna_storage_at(self._storage.url):
            super().restore(checkpoint_path)
        self._ask_again_missing_trials()
        for trial_id, (value, state) in list(self.__dict__.get("_untold", {}).items()):
            self._tell(trial_id, value, state)  # ended while the database was down (on_trial_complete)
            self._completed_trials.add(trial_id)
            del self._untold[trial_id]

    def _ask_again_missing_trials(self) -> None:
        """A fresh head's study is the copy last published, which may predate trials that Tune's saved searcher
        holds (asked after that copy): each such unfinished trial is asked again with its parameters, so that its
        reports and result land in the study rather than end the sweep with Optuna's "Record does not exist"."""
        storage = self._ot_study._storage
        missing = []
        for trial_id, ot_trial in self._ot_trials.items():  # all checked before any ask: a new trial may take an id
            if trial_id in self._completed_trials:
                continue
            try:
                storage.get_trial(ot_trial._trial_id)
            except KeyError:
                missing.append(trial_id)
        for trial_id in missing:
            frozen = self._ot_trials[trial_id]._cached_frozen_trial
            self._ot_study.enqueue_trial(frozen.params, skip_if_exists=False)
            self._ot_trials[trial_id] = self._ot_study.ask(frozen.distributions)
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
            self._reported.pop(trial_id, None)
            log.warning("optuna: trial %s was not in the study restored; asked again with its parameters", trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials and not result.get(FINAL):
            with contextlib.suppress(DatabaseDown):  # the loop ends after this step (TrialEnd.on_step_end)
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
        try:
            if state == TrialState.PRUNED:
                self._report(trial_id, result or {})
            self._tell(trial_id, value, state)
        except DatabaseDown:  # Tune's loop ends after this step (TrialEnd.on_step_end). A trial Tune saves as ended
            if state != TrialState.FAIL:  # is told by restore(); an errored one runs again on --resume
                self.__dict__.setdefault("_untold", {})[trial_id] = (value, state)
            return
        self._completed_trials.add(trial_id)

    def _tell(self, trial_id: str, value: float | None, state: TrialState) -> None:
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        except DatabaseDown:  # a ValueError too
            raise
        except (ValueError, RuntimeError) as e:  # e.g. told already before a driver crash
            log.warning("optuna: trial %s: %s", trial_id, e)


@contextlib.contextmanager
def optuna_storage_at(url: str):
    """Inside the block, every ``RDBStorage`` unpickled connects to ``url`` instead of the URL it was saved with (a
    restored sweep has one Optuna storage: the study's). Optuna 5's ``RDBStorage.__setstate__`` opens the engine."""
    original = optuna.storages.RDBStorage.__setstate__

    def at_url(storage, state: dict) -> None:
        original(storage, {**state, "url": url})

    optuna.storages.RDBStorage.__setstate__ = at_url
    try:
        yield
    finally:
        optuna.storages.RDBStorage.__setstate__ = original


def make_searcher(cfg: SweepConfig, paths: SweepPaths) -> PruneAwareOptunaSearch:
    storage = study_storage(paths.optuna_url)  # pickled with Tune's experiment: its URL masked
    startup = cfg.startup_trials if cfg.startup_trials is not None else max(1, cfg.num_samples // 2)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)
    space = {k: p.distribution() for k, p in cfg.search.items()}
    return PruneAwareOptunaSearch(space, metric=OBJECTIVE, mode=MODE, sampler=sampler, study_name=cfg.name,
                                  storage=storage, points_to_evaluate=list(cfg.points_to_evaluate) or None)


def make_scheduler(cfg: SweepConfig):
    if cfg.asha is None:
        return FIFOScheduler()
    a = cfg.asha
    return ASHAScheduler(time_attr=a.time_attr, metric=VAL_METRIC, mode=MODE, max_t=a.max_t,
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
            # stopped by ASHA is an outcome, not a failure: FINISHED (not KILLED's red cross), tagged
            self._end(trial, "FINISHED", {"stopped_early": "asha"})
            with contextlib.suppress(Exception):  # a URI storage holds none: it stays in the trial's node cache
                open_storage(self.sets_dir).remove(f"{trial.trial_id}/checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    def on_step_end(self, iteration, trials, **info):
        """The study's database given up on (:func:`tune.database.gone`): Tune's loop ends here, uncaught, as a
        killed driver's would (no last save; the searcher swallowed the error, which Tune would make a trial's)."""
        if (down := gone()) is not None:
            raise down


def end_left_running(tracker: SweepTracker, study: optuna.Study) -> list[str]:
    """The child runs of trials the study holds as ended but MLflow as RUNNING (the trial ended while the tracking
    store could not be reached: :class:`TrialEnd` failed, the trial is not run again), ended as :class:`TrialEnd`
    would have, a complete one with its objective. Returns their trial ids."""
    ended = {t.user_attrs.get("ray_trial_id"): t for t in study.trials
             if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    done = []
    for run in tracker.child_runs():
        trial = ended.get(run.data.tags.get(TRIAL_TAG))
        if run.info.status != "RUNNING" or trial is None:
            continue
        if trial.state == TrialState.COMPLETE and OBJECTIVE not in run.data.metrics:
            tracker.log_child_metrics(run.data.tags[TRIAL_TAG], {OBJECTIVE: trial.value})
        tags = {"stopped_early": "asha"} if trial.state == TrialState.PRUNED else None
        tracker.end_child(run.data.tags[TRIAL_TAG], "FINISHED", tags)
        done.append(run.data.tags[TRIAL_TAG])
    return done


def trial_dirname(trial) -> str:
    """Trial folders named by id: hyperparameters live in MLflow params, not in 200-character folder names."""
    return trial.trial_id
