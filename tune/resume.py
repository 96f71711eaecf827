"""What a resumed sweep reads back before Ray starts: its state file, its Optuna study, the configuration it was
started with. Each is read whole or refused in one line naming the file (:class:`dilm.DilmError`): a damaged file
is never half-used, and nothing has started yet when it is found. And which MLflow store the state file's parent run
lives in, wherever this head keeps the driver's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import optuna
import sqlalchemy.exc

from dilm import DilmError
from tune.config import RETIRED_KEYS, SweepConfig, SweepPaths
from tune.database import SCHEMA, masked, reason, study_storage


def read_state(paths: SweepPaths) -> dict:
    """``state/<name>.json`` (the MLflow parent run, the configuration), ``{}`` for a sweep that has none."""
    path = paths.state_file
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # cut short, not UTF-8, not JSON
        raise damaged(path, e, "delete it to resume in a new MLflow parent run (the YAML is then not compared)") from e
    if not isinstance(state, dict):
        raise damaged(path, ValueError("not a JSON object"), "delete it to resume in a new MLflow parent run")
    return state


def study_exists(paths: SweepPaths, name: str) -> bool:
    """Whether the study ``name`` is in the sweep's Optuna storage; a database that cannot be read is one line."""
    if not paths.database and not (paths.storage / "optuna.db").exists():
        return False
    try:
        return name in optuna.study.get_all_study_names(study_storage(paths.optuna_url))
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as e:  # "file is not a database", a table missing, ...
        if paths.database:
            raise DilmError(f"tracking_db {masked(paths.database)}: cannot read its Optuna studies (schema "
                            f"{SCHEMA}): {reason(e, paths.database)}") from None
        raise damaged(paths.storage / "optuna.db", e, "restore it from a copy (a URI storage's published one), "
                      "or start the sweep again under another --name") from e


def damaged(path: Path | str, e: Exception, remedy: str) -> DilmError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return DilmError(f"{path} is damaged ({type(e).__name__}: {reason}): {remedy}")


def own_store(paths: SweepPaths) -> str:
    """The URI of the driver's own MLflow store, ``mlflow.db`` in its folder."""
    return f"sqlite:///{paths.storage.resolve() / 'mlflow.db'}"


def same_store(state: dict, uri: str, paths: SweepPaths) -> bool:
    """Whether the state file's MLflow store is ``uri``, where the parent run it names can be continued: the same
    URI (saved with its password masked), or the driver's own ``mlflow.db`` both times (a fresh head's folder may be
    at another path: the file moved with the storage's published copy)."""
    return state.get("tracking_uri") == masked(uri) or bool(state.get("own_store") and uri == own_store(paths))


def _as_saved(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=str))  # as in the state file: tuples become lists


def check_same_config(cfg: SweepConfig, paths: SweepPaths) -> None:
    """A resumed sweep keeps its search space and schedule (restored by Tune): refuse a YAML that now differs
    (``storage`` and ``description`` aside: where the sweep lives and free text). The saved configuration is read
    with today's schema first, so keys retired or added since it was saved (with their defaults) are no change."""
    saved = read_state(paths).get("config")
    if not saved:
        return
    with contextlib.suppress(DilmError):  # no longer valid on its own: compared as it was saved
        saved = _as_saved(SweepConfig.from_dict({k: v for k, v in saved.items() if k not in RETIRED_KEYS}).to_dict())
    now = _as_saved(cfg.to_dict())
    if not isinstance(saved.get("task"), dict) or not saved["task"].get("sha256"):  # saved before tasks were pinned
        now["task"] = _as_saved(dataclasses.replace(cfg.task, sha256="").to_ref())
    changed = sorted(k for k in set(saved) | set(now) if k not in ("storage", "description")
                     and saved.get(k) != now.get(k))
    if changed:
        raise DilmError(f"sweep {cfg.name!r} was started with a different configuration ({', '.join(changed)} "
                        "changed): resume it with the same YAML, or start another with --name")
