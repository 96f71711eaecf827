"""Where a sweep keeps its state: :class:`SweepPaths`, the layout of its storage.

The storage (``--storage``, else the YAML's ``storage``, else ``$DILM_SWEEP_DIR`` or ``./runs/sweeps``; made absolute,
but refused if relative inside a Ray job, whose working dir is Ray's temporary copy of the uploaded folder)::

    mlflow.db, mlartifacts/      MLflow store shared by all sweeps here (``dilm ui``), unless $MLFLOW_TRACKING_URI
    optuna.db                    one Optuna study per sweep name (``optuna-dashboard sqlite:////<storage>/optuna.db``)
    tune/<name>/                 the Ray Tune experiment (what ``--resume`` restores); ``tune_storage`` may move it
    lm/<lm_cache_key>/           shared LM-stage checkpoints (train_lm; written atomically), one per distinct LM
                                 config, reused by every sweep and resume here; another LM key or data, another key
    sets/<name>/baselines/       random real sets and vanilla-LM sets scored beside the trials
    sets/<name>/<trial_id>/      a trial's distill output: sets/, provenance.json, scores.json, plots/, final.json
                                 (and checkpoint/ while it runs: removed when it ends, kept if it errored)
    state/<name>.json            the MLflow parent run id and the configuration, so a resumed sweep continues the
                                 same parent run and refuses a changed YAML
    reports/<name>/              trials.csv and the parameter-importance plot of the sweep

With ``tracking_db`` (:mod:`tune.database`) the MLflow runs and the study are in that database instead of
``mlflow.db`` and ``optuna.db``; the artifacts stay in ``mlartifacts/``.

A URI storage (``s3://``, ``gs://``, ... — :mod:`tune.storage`) has the same layout. The trials read and write it
through pyarrow only; the driver keeps its own files (``mlflow.db``, ``mlartifacts/``, ``optuna.db``, ``state/``,
``reports/``) in a local mirror (``$DILM_CACHE/storage/mirror/<slug>``), publishes them as the sweep goes
(:mod:`tune.publish`) and fetches them when a resume finds the mirror empty (a new head).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dilm import DilmError
from tune.database import with_driver
from tune.storage import Storage, is_uri, join, node_cache, open_storage, slug
from tune.tracking import default_storage, tracking_uri

# set by Ray in the environment of a `ray job submit` entrypoint (runtime env and metadata as JSON), of no other driver
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
BASELINES_DIR = "baselines"  # sets/<name>/baselines/<baseline>/


def in_ray_job() -> bool:
    return RAY_JOB_ENV in os.environ


def local_folder(path: str | Path, what: str) -> Path:
    """``path`` made absolute; refused (DilmError) when relative inside a Ray job, where the working directory is
    Ray's temporary copy of the uploaded folder (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and in_ray_job():
        raise DilmError(f"{what} {str(path)!r} is relative: inside a Ray job it would land in Ray's temporary copy of "
                        "the working dir, deleted with Ray's session; pass an absolute path (e.g. --storage "
                        '"$PWD/runs/sweeps", expanded by the shell that submits the job)')
    return p.resolve()


@dataclass(frozen=True)
class SweepPaths:
    """Where the sweep ``name`` keeps its state (see the module docstring). ``location`` is the storage as given (a
    folder or a URI); ``storage`` the driver's own folder: the storage itself when it is a folder, else its local
    mirror in the node cache (the databases, state and reports, uploaded to ``location`` by the driver)."""

    storage: Path
    name: str
    tune_storage: str
    location: str = ""
    database: str = field(default="", repr=False)  # the tracking database's URL (tune.database), password and all

    @classmethod
    def of(cls, cfg) -> SweepPaths:
        """The paths of the sweep ``cfg`` (a :class:`tune.config.SweepConfig`)."""
        where = ("storage" if cfg.storage else "$DILM_SWEEP_DIR" if os.environ.get("DILM_SWEEP_DIR")
                 else "the default storage")
        given = cfg.storage or os.environ.get("DILM_SWEEP_DIR") or str(default_storage())
        if is_uri(given):
            location, storage = str(given), node_cache("mirror", slug(str(given)))
        else:
            storage = local_folder(given, where)
            location = str(storage)
        tune_storage = cfg.tune_storage or join(location, "tune")
        if "://" not in tune_storage:  # a local folder or a shared mount; else s3://, gs://, ... as given
            tune_storage = str(local_folder(tune_storage, "tune_storage"))
        return cls(storage, cfg.name, tune_storage, location, with_driver(cfg.tracking_db))

    @property
    def remote(self) -> bool:
        """Whether the storage is a URI (trials then reach it only through pyarrow, never by a path)."""
        return is_uri(self.location)

    @property
    def store(self) -> Storage:
        return open_storage(self.location)

    @property
    def tune_dir(self) -> str:
        return join(self.tune_storage, self.name)

    @property
    def lm_dir(self) -> Path:
        return self.storage / "lm"  # shared by every sweep of this storage: one checkpoint per lm_cache_key

    @property
    def lm_location(self) -> str:
        return join(self.location, "lm")

    @property
    def sets_dir(self) -> Path:
        return self.storage / "sets" / self.name

    @property
    def sets_location(self) -> str:
        return join(self.location, "sets", self.name)

    def trial_dir(self, trial_id: str) -> Path:
        """A trial's distill output (sets/, provenance.json, scores.json, plots/, final.json)."""
        return self.sets_dir / trial_id

    def trial_sets(self, trial_id: str) -> Path:
        """A trial's final sets: ``dpc<d>/set<k>.jsonl``."""
        return self.trial_dir(trial_id) / "sets"

    def trial_sets_location(self, trial_id: str) -> str:
        """:meth:`trial_sets` in the storage as given (a folder or a URI): where the console sends the user."""
        return join(self.sets_location, trial_id, "sets")

    @property
    def baselines_location(self) -> str:
        return join(self.sets_location, BASELINES_DIR)

    def baseline_dir(self, name: str) -> Path:
        """A baseline's output beside the trials (``vanilla``: the vanilla LM's sets and provenance)."""
        return self.sets_dir / BASELINES_DIR / name

    @property
    def optuna_url(self) -> str:
        return self.database or f"sqlite:///{self.storage / 'optuna.db'}"

    @property
    def mlflow_url(self) -> str:
        """MLflow's backend store: the tracking database, else ``$MLFLOW_TRACKING_URI`` or ``mlflow.db`` here."""
        return self.database or tracking_uri(self.storage)

    @property
    def state_file(self) -> Path:
        return self.storage / "state" / f"{self.name}.json"

    @property
    def reports_dir(self) -> Path:
        return self.storage / "reports" / self.name

    def driver_files(self) -> list[str]:
        """The driver's files of this sweep, as keys under ``storage`` (what it uploads to a URI storage)."""
        databases = [] if self.database else ["optuna.db", "mlflow.db"]  # else in the tracking database
        return [*databases, f"state/{self.name}.json", f"reports/{self.name}", "mlartifacts"]
