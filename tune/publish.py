"""The driver's files published to a URI storage as the sweep goes, so that losing the head loses only running trials.

With a URI storage the driver keeps ``optuna.db``, ``mlflow.db``, ``mlartifacts/``, ``state/`` and ``reports/`` in
its local mirror (:mod:`tune.paths`). :class:`Publisher`, a Ray Tune callback of the driver, uploads them:

* after each trial ends (completed, stopped early or errored), at the end of the Tune step that processed it — by
  then the searcher has told Optuna and the MLflow child run has its terminal status;
* at least every ``every_s`` seconds otherwise (the running trials' metrics and artifacts);
* once when the sweep starts and, fully, when the driver ends (:func:`tune.storage.sync_up`).

Each upload is consistent on its own: a database through sqlite's online backup (a snapshot while MLflow's server and
Optuna keep writing), every file to a temporary key then moved (:class:`tune.storage.ArrowStorage`). Only files that
changed since the last upload go (size and mtime; a database with its ``-wal``). Last comes the marker
``state/<name>.published.json``: when, and which trials had ended. A ``--resume`` on a fresh head fetches them
(:func:`tune.storage.sync_down`); Tune's experiment state reaches the storage by Tune itself (every ~10 s). What a
lost head costs: the trials running then (restarted: their checkpoints stayed in that node's staging folder), and the
trials that ended after the last publish (reported again from their ``final.json``; their MLflow run as it was then).

A failed upload (the storage unreachable) is one warning line; it is retried after 5 s, then twice as long each time
up to ``every_s`` (nothing half-written: the storage keeps the last whole copy of each file), and the sweep goes on;
one line again when it succeeds.
The callback is attached to the Tuner after it is built (:func:`attach`), so it is never pickled with the experiment.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

from ray.tune import Callback

from tune.storage import Storage, snapshot_sqlite

SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def _signature(path: Path) -> tuple:
    """What tells that a file changed: size and mtime (a database's ``-wal`` too)."""
    st = path.stat()
    sig = (st.st_size, st.st_mtime_ns)
    wal = path.with_name(path.name + "-wal")
    return sig + ((wal.stat().st_size, wal.stat().st_mtime_ns) if wal.exists() else ())


class Publisher(Callback):
    """Driver side: uploads the driver's files ``keys`` (files or folders under ``local``) to ``store`` as the sweep
    goes (see the module docstring). ``marker`` is the key of the JSON written last on every publish."""

    def __init__(self, store: Storage, local: Path, keys: list[str], marker: str, every_s: float = 120.0):
        self.store, self.local, self.keys, self.marker = store, Path(local), list(keys), marker
        self.every_s = every_s
        self.ended: list[str] = []  # trial ids, in the order they ended
        self._seen: dict[str, tuple] = {}  # key → signature of the copy on the storage
        self._due = False
        self._last = time.monotonic()
        self._failing = False
        self._backoff = 0.0  # seconds to wait after a failed publish (0 after a success)
        self._next_try = 0.0  # monotonic time before which none is tried
        self.published = 0  # successful publishes (tests, the summary)

    # ---------------------------------------------------------------- Tune's hooks (driver, Tune's loop)

    def _ended(self, trial) -> None:
        if trial.trial_id not in self.ended:
            self.ended.append(trial.trial_id)
        self._due = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now >= self._next_try and (self._due or now - self._last >= self.every_s):
            self.publish()

    # ---------------------------------------------------------------- the upload

    def changed(self) -> list[Path]:
        """The files under ``keys`` that differ from what was last uploaded (sqlite sidecars left out)."""
        out = []
        for key in self.keys:
            path = self.local / key
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            out += [f for f in files if f.exists() and not f.name.endswith(SQLITE_SIDECARS)
                    and not f.name.startswith(".") and self._seen.get(self._key(f)) != _signature(f)]
        return out

    def _key(self, f: Path) -> str:
        return f.relative_to(self.local).as_posix()

    def publish(self) -> bool:
        """Upload what changed, then the marker; ``False`` (one warning line, retried next time) if the storage
        failed."""
        self._due, self._last = False, time.monotonic()
        try:
            for f in self.changed():
                key, sig = self._key(f), _signature(f)
                if f.suffix == ".db":
                    snap = snapshot_sqlite(f, self.local / ".upload" / f.name)
                    self.store.put_file(snap, key)
                    snap.unlink()
                else:
                    self.store.put_file(f, key)
                self._seen[key] = sig
            self.store.write_json(self.marker, {
                "published_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "trials_ended": self.ended})
        except Exception as e:  # pyarrow's OSError, a botocore error, ...: the sweep goes on, the next call retries
            if not self._failing:
                print(f"warning: could not publish the sweep's databases to {self.store.location} ({type(e).__name__}:"
                      f" {str(e)[:300]}); retrying in 5 s, then less often",
                      file=sys.stderr, flush=True)
            self._failing, self._due = True, True
            self._backoff = min(self.every_s, max(5.0, 2 * self._backoff))
            self._next_try = time.monotonic() + self._backoff
            return False
        if self._failing:
            print(f"sweep databases published to {self.store.location} again", file=sys.stderr, flush=True)
        self._failing, self._backoff, self._next_try = False, 0.0, 0.0
        self.published += 1
        return True


def attach(tuner, publisher: Publisher) -> None:
    """Add ``publisher`` to a built (or restored) Tuner's callbacks, in place of any other Publisher: after the
    Tuner saved itself, so the experiment never holds it (Ray 2.60 internals: ``_local_tuner._run_config``)."""
    run_config = tuner._local_tuner._run_config
    run_config.callbacks = [c for c in run_config.callbacks or [] if not isinstance(c, Publisher)] + [publisher]
