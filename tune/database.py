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
"""

from __future__ import annotations

import re

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from dilm import DilmError

SCHEMA = "optuna"  # the study's schema in the tracking database (MLflow: the default one)
FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"


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
    line before anything starts."""
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


class StudyStorage(optuna.storages.RDBStorage):
    """The sweep's Optuna storage; pickled (Tune saves the searcher with the experiment) with its URL masked. A resumed
    sweep gives it the URL again (:func:`tune.search.optuna_storage_at`). Keep the name: pickles name it."""

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "url": masked(self.url)}


def study_storage(url: str) -> StudyStorage:
    """The Optuna storage on ``url``: a sqlite file as given, a tracking database in its schema :data:`SCHEMA`, each
    pooled connection checked before use (``pool_pre_ping``, as MLflow's server does): after the database server
    restarts, the driver's next call opens a new connection instead of failing on a closed one."""
    if url.startswith("sqlite:"):
        return StudyStorage(url)
    return StudyStorage(url, engine_kwargs={"connect_args": {"options": f"-csearch_path={SCHEMA}"},
                                            "pool_pre_ping": True})
