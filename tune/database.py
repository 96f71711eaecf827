"""A sweep's records in the user's database (``--tracking-db URL``, or ``tracking_db:`` in the sweep YAML): MLflow's
backend store and the Optuna study on one SQLAlchemy URL, in place of the driver's ``mlflow.db`` and ``optuna.db``, so
that the head holds nothing that matters (``mlartifacts/``, ``state/`` and ``reports/`` are still published).

One database, two schemas. MLflow and Optuna both keep their schema's version in a table named ``alembic_version``:
in one schema each reads the other's revision and refuses it (Optuna 5: "no longer compatible with the table schema").
MLflow keeps the database's default schema; the study goes to the schema ``optuna`` (:data:`SCHEMA`, made when the
sweep starts) through PostgreSQL's ``search_path``, which is why the URL must be PostgreSQL (``postgresql://``, driver
psycopg2, which ``pip install -e .`` brings, for ``postgresql://``: :func:`with_driver`).

The URL's password: the driver holds it, the tracking server gets it in its environment (``MLFLOW_BACKEND_STORE_URI``,
not its command line, which ``ps`` shows), trials never (they log through the server). Everything written — the state
file, MLflow params, Tune's pickled searcher (:class:`StudyStorage`), the summary, errors — has ``***`` in its place
(:func:`masked`). A URL without a password takes it from libpq's usual places (``$PGPASSWORD``, ``~/.pgpass``).

The database down mid-sweep: each call of the driver's Optuna storage that cannot reach it is tried again, 1 s later
then twice as long each time (at most 30 s), for up to ``$DILM_TRACKING_DB_WAIT_S`` seconds (:data:`WAIT_ENV`,
default 300) from its first failure — one warning line when it starts waiting, one when the database answers again
— then it raises :class:`DatabaseDown`: one line naming the URL (masked). The driver then gives up on the database
(:func:`gone`: later calls fail at once) and the sweep ends as a killed driver would, resumable: the searcher keeps
what it could not tell, Tune's loop ends after its step (``tune.search``), the driver prints the line (exit status 2),
the study as its last whole transaction left it (a call is one transaction).
Only a lost connection is retried (SQLAlchemy's ``OperationalError``, ``InterfaceError``, an invalidated
connection), never a statement the database refused.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import time

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, NoSuchModuleError, OperationalError, SQLAlchemyError

from dilm import DilmError

SCHEMA = "optuna"  # the study's schema in the tracking database (MLflow: the default one)
FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
WAIT_ENV, DEFAULT_WAIT_S = "DILM_TRACKING_DB_WAIT_S", 300.0  # how long the driver waits for its study's database


def masked(url: str) -> str:
    """``url`` with its password as ``***`` (SQLAlchemy's rendering; for one that does not parse, whatever stands
    between ``scheme://USER:`` and ``@``)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)


def with_driver(url: str) -> str:
    """``postgresql://`` with psycopg2 named (SQLAlchemy 2.1 takes psycopg 3 for it, which dilm does not install);
    any other URL as given."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url
    if parsed.drivername != "postgresql":
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def check_url(url: str) -> None:
    """A PostgreSQL URL whose driver is installed, or one line (:class:`DilmError`); connects to nothing."""
    try:
        parsed = make_url(with_driver(url))
    except (ArgumentError, ValueError):
        raise DilmError(f"tracking_db {masked(url)}: not a SQLAlchemy URL; give {FORM}") from None
    if parsed.get_backend_name() != "postgresql":
        raise DilmError(f"tracking_db {masked(url)}: MLflow and Optuna share it in two schemas, which needs "
                        f"PostgreSQL; give {FORM}")
    try:
        parsed.get_dialect().import_dbapi()
    except (NoSuchModuleError, ImportError) as e:
        raise DilmError(f"tracking_db {masked(url)}: its driver is not installed ({e})") from None


def connect(url: str, timeout_s: int = 10) -> None:
    """Connect once and make the study's schema: an unreachable server, a wrong password or a missing database is one
    line before anything starts. A database given up on before (:func:`gone`) is forgotten."""
    _gone.clear()
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": timeout_s})
    try:
        with engine.begin() as con:
            con.execute(sqlalchemy.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    except SQLAlchemyError as e:
        raise DilmError(f"tracking_db {masked(url)}: cannot use it ({reason(e, url)})") from None
    finally:
        engine.dispose()


def reason(e: Exception, url: str) -> str:
    """The first line of a database error, the URL's password removed should the driver have quoted it."""
    line = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
    password = make_url(url).password
    return line.replace(str(password), "***") if password else line


def dashboard_url(url: str) -> str:
    """The study's storage as ``optuna-dashboard URL`` takes it: a tracking database with its schema, masked."""
    if url.startswith("sqlite:"):
        return url
    return masked(make_url(url).update_query_dict({"options": f"-csearch_path={SCHEMA}"}).render_as_string(False))


class DatabaseDown(DilmError):
    """The study's database unreachable for longer than the driver waits (:func:`wait_s`): one line."""


def wait_s() -> float:
    """``$DILM_TRACKING_DB_WAIT_S``, else :data:`DEFAULT_WAIT_S`: seconds a call waits for the database."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise DilmError(f"${WAIT_ENV}={raw!r}: give a number of seconds") from None


def lost_connection(e: BaseException | None) -> SQLAlchemyError | None:
    """The error in ``e``'s chain (Optuna wraps SQLAlchemy's in ``StorageInternalError``) that says the database
    could not be reached, or ``None`` (``e`` is something else: a statement refused, a bug)."""
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OperationalError | InterfaceError) or getattr(e, "connection_invalidated", False):
            return e
        e = e.__cause__ or e.__context__
    return None


_gone: list[DatabaseDown] = []  # the database this driver gave up on (:func:`connect` forgets it)


def gone() -> DatabaseDown | None:
    """The error that gave up on the study's database, once one has (then every call fails at once)."""
    return _gone[0] if _gone else None


def retry(call, url: str, say=print, sleep=time.sleep, clock=time.monotonic):
    """``call()``, tried again while it cannot reach the database at ``url`` (see the module docstring)."""
    if _gone:
        raise _gone[0]
    start, delay, warned = clock(), 1.0, False
    while True:
        try:
            result = call()
        except Exception as e:
            lost = lost_connection(e)
            if lost is None:
                raise
            waited, limit = clock() - start, wait_s()
            if waited >= limit:
                _gone.append(DatabaseDown(f"the sweep's database {masked(url)} did not answer for {waited:.0f} s "
                                          f"({reason(lost, url)}): the sweep stopped; continue it with --resume once "
                                          f"the database is back (${WAIT_ENV}={limit:g} s is the wait)"))
                raise _gone[0] from None
            if not warned:
                say(f"warning: the sweep's database {masked(url)} does not answer ({reason(lost, url)}); trying "
                    f"again for up to {limit:g} s", file=sys.stderr, flush=True)
                warned = True
            sleep(min(delay, limit - waited))
            delay = min(2 * delay, 30.0)
            continue
        if warned:
            say(f"the sweep's database {masked(url)} answers again", file=sys.stderr, flush=True)
        return result


_in_call = threading.local()  # a storage call made inside another one: the outer one retries


def retried(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_in_call, "on", False):
            return method(self, *args, **kwargs)
        _in_call.on = True
        try:
            return retry(lambda: method(self, *args, **kwargs), self.url)
        finally:
            _in_call.on = False

    return call


class StudyStorage(optuna.storages.RDBStorage):
    """The sweep's Optuna storage; pickled (Tune saves the searcher with the experiment) with its URL masked. A resumed
    sweep gives it the URL again (:func:`tune.search.optuna_storage_at`). Keep the name: pickles name it. Each call
    that reaches the database waits for it (:func:`retry`)."""

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "url": masked(self.url)}


# every call of Optuna's storage API that reaches the database, and the private ones its cache calls (Optuna 5)
for _name in sorted({n for n in vars(optuna.storages.BaseStorage) if not n.startswith("_")} - {
        "check_trial_is_updatable", "remove_session"} | {"_create_new_trial", "_set_trial_param", "_get_best_trial_id",
                                                         "_get_trials", "_get_stale_trial_ids"}):
    setattr(StudyStorage, _name, retried(getattr(optuna.storages.RDBStorage, _name)))


def study_storage(url: str) -> StudyStorage:
    """The Optuna storage on ``url``: a sqlite file as given, a tracking database in its schema :data:`SCHEMA`, each
    pooled connection checked before use (``pool_pre_ping``, as MLflow's server does): after the database server
    restarts, the driver's next call opens a new connection instead of failing on a closed one."""
    if url.startswith("sqlite:"):
        return StudyStorage(url)
    return StudyStorage(url, engine_kwargs={"connect_args": {"options": f"-csearch_path={SCHEMA}",
                                                             "connect_timeout": 10},  # a host gone: 10 s a try
                                            "pool_pre_ping": True})
