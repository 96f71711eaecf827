"""Credentials of the tracking server the driver serves (:mod:`tune.mlflow_server`): who may write to a sweep's runs.

The server runs MLflow's own ``basic-auth`` app (``mlflow server --app-name basic-auth``, MLflow 3.17 with its
``auth`` extra, i.e. Flask-WTF). Per driver run: a new admin password (``secrets``, 32 characters; MLflow ships no
default and refuses one under 12) and a new Flask secret key (CSRF). Where each secret lives, and where it never does:

* the server gets them in its environment only (``MLFLOW_AUTH_ADMIN_PASSWORD``, ``MLFLOW_FLASK_SERVER_SECRET_KEY``);
  its auth config file (no secret in it) and user database (a PBKDF2 hash) sit in a private temporary folder
  removed when the server stops — never in the storage or the driver's folder, which are uploaded;
* the driver's own MLflow client (parent run, baselines, the Tune callback) reads them from its environment
  (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which MLflow reads on every request), set while the
  server runs: :func:`client_env`;
* trials get them as a ``tune.with_parameters`` argument (Ray's object store, in memory; not the Ray job's runtime
  env, which the dashboard and ``ray job list`` show, nor Tune's saved experiment, which holds no trainable
  arguments) and put them in their worker's environment before logging: :func:`with_credentials`;
* the user reads them from a file only they may read (0600, in ``$DILM_CACHE/secrets/``), which the driver names
  when it starts: :func:`save_login`. Nothing prints the password.

:class:`Credentials` never shows its password in a ``repr`` (a traceback, a log line of its owner).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dilm.files import atomic_write_text, cache_dir

USER = "dilm"
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    """A user of the tracking server; ``repr`` hides the password."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def generate(cls, username: str = USER) -> Credentials:
        return cls(username, secrets.token_urlsafe(24))

    def client_env(self) -> dict[str, str]:
        """What an MLflow client's environment needs to log to the server as this user."""
        return {USERNAME_ENV: self.username, PASSWORD_ENV: self.password}


AUTH_INI = """[mlflow]
# written by dilm for one tracking server; the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD (environment)
default_permission = NO_PERMISSIONS
database_uri = sqlite:///{db}
admin_username = {user}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def server_env(admin: Credentials, folder: Path) -> dict[str, str]:
    """The environment that starts ``mlflow server --app-name basic-auth`` with ``admin`` as its only user; its config
    and user database go to ``folder`` (private, temporary: see the module docstring)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ini = folder / "basic_auth.ini"
    ini.write_text(AUTH_INI.format(db=folder / "basic_auth.db", user=admin.username))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": admin.username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}


@contextlib.contextmanager
def client_env(creds: Credentials | None) -> Iterator[None]:
    """This process's MLflow clients log as ``creds`` inside the block (nothing changes for ``None``); the variables
    are restored after it."""
    if creds is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in (USERNAME_ENV, PASSWORD_ENV)}
    os.environ.update(creds.client_env())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_credentials(trainable: Callable) -> Callable:
    """``trainable(config, **kwargs)`` that first puts ``credentials`` (a keyword argument given through
    ``tune.with_parameters``; ``None``: none) in the worker's environment. Keeps the trainable's name: Tune checks
    it when a sweep is restored."""

    def run(config: dict, credentials: Credentials | None = None, **kwargs):
        if credentials is not None:
            os.environ.update(credentials.client_env())
        return trainable(config, **kwargs)

    run.__name__ = trainable.__name__
    return run


def login_file(name: str, location: str) -> Path:
    """Where the user finds a sweep's login: outside every folder the driver uploads."""
    from tune.storage import slug

    return cache_dir() / "secrets" / f"{slug(location)}-{name}.mlflow-login"


def save_login(path: Path, url: str, creds: Credentials) -> Path:
    """The server's URL, user and password in ``path``, readable by this user only (0600 from its creation)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = f"url={url}\nusername={creds.username}\npassword={creds.password}\n"
    old = os.umask(0o077)
    try:
        atomic_write_text(path, text)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return path
